//! `GET /admin/targets`: each target as the workers report it (state, in
//! flight, limit, held); `POST /admin/targets/{name}/pause` and
//! `.../resume`: `hookq target pause|resume` over HTTP, logged with the
//! token's label. The admin keeps one listener on `P.control` for as long as
//! it runs ([`crate::targets::Watch`]), so a listing answers at once.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use super::{Admin, ApiError};
use crate::config::Target;
use crate::targets;

pub const LIST: &str = "/admin/targets";
pub const PAUSE: &str = "/admin/targets/{name}/pause";
pub const RESUME: &str = "/admin/targets/{name}/resume";

fn find(admin: &Admin, name: &str) -> Result<Target, ApiError> {
    admin
        .targets
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::NoTarget(name.chars().take(200).collect()))
}

/// `GET /admin/targets`.
pub async fn list(State(admin): State<Arc<Admin>>) -> Response {
    let watch = admin.watch().await;
    match watch.views(&admin.broker, &admin.targets).await {
        Ok(views) => Json(serde_json::json!({ "targets": views })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /admin/targets/{name}/pause`.
pub async fn pause(State(admin): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    change(&admin, &name, true).await
}

/// `POST /admin/targets/{name}/resume`.
pub async fn resume(State(admin): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    change(&admin, &name, false).await
}

async fn change(admin: &Admin, name: &str, pause: bool) -> Response {
    let target = match find(admin, name) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let done = if pause {
        let by = format!("admin API ({})", admin.label);
        targets::pause(&admin.broker, &target, &by).await
    } else {
        targets::resume(&admin.broker, &target).await
    };
    if let Err(e) = done {
        return ApiError::from(e).into_response();
    }
    let (action, state) = if pause {
        ("target.pause", "paused")
    } else {
        ("target.resume", "resumed")
    };
    tracing::info!(who = %admin.label, action, target_name = %target.name, "admin {state} a target");
    Json(serde_json::json!({ "target": target.name, "state": state })).into_response()
}
