//! How some keys are written: milliseconds as `Duration`s (`*_ms`), lists
//! that the environment gives as one comma-separated string, broker URLs, and
//! `worker.partitions`. Each deserializer names what it expected, and the
//! loader adds the key (serde_path_to_error).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

use super::{AmqpUrl, MAX_MS, WorkerPartitions};

/// A list from a TOML array, or from the environment one value or a
/// comma-separated string.
#[derive(Deserialize)]
#[serde(untagged)]
enum ListOr<T> {
    List(Vec<T>),
    One(T),
    Text(String),
}

fn ms_of<E: serde::de::Error>(v: u64) -> Result<Duration, E> {
    if v > MAX_MS {
        return Err(E::custom(format!(
            "{v} ms is more than 10 years ({MAX_MS} ms)"
        )));
    }
    Ok(Duration::from_millis(v))
}

fn to_ms(d: &Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `*_ms`: milliseconds, at most 10 years (anything longer is a typo, and the
/// bound keeps every later conversion free of overflow).
pub mod ms {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        ms_of(u64::deserialize(d)?)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_ms(v))
    }
}

/// An optional `*_ms` (unset: a default worked out from other keys).
pub mod opt_ms {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Some(ms_of(u64::deserialize(d)?)?))
    }

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_u64(to_ms(d)),
            None => s.serialize_none(),
        }
    }
}

/// `retry.delays_ms`: `[100, 500]`, or `HOOKQ__RETRY__DELAYS_MS=100,500`.
pub mod ms_list {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let list = match ListOr::<u64>::deserialize(d)? {
            ListOr::List(v) => v,
            ListOr::One(n) => vec![n],
            ListOr::Text(t) => t
                .split(',')
                .map(|p| p.trim().parse::<u64>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{t:?} is not a comma-separated list of milliseconds"
                    ))
                })?,
        };
        list.into_iter().map(ms_of).collect()
    }

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(to_ms))
    }
}

/// `amqp.url`: `"amqp://a"`, `["amqp://a", "amqp://b"]`, or
/// `HOOKQ__AMQP__URL=amqp://a,amqp://b`.
pub mod urls {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AmqpUrl>, D::Error> {
        let texts: Vec<String> = match ListOr::<String>::deserialize(d)? {
            ListOr::List(v) => v,
            ListOr::One(t) | ListOr::Text(t) => t
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
        };
        texts
            .iter()
            .map(|u| AmqpUrl::parse(u).map_err(serde::de::Error::custom))
            .collect()
    }

    pub fn serialize<S: Serializer>(v: &[AmqpUrl], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(AmqpUrl::expose))
    }
}

/// `worker.partitions`: `"all"`, or a list of indexes (from the environment a
/// comma-separated string, `"0,3,5"`).
pub mod partitions {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<WorkerPartitions, D::Error> {
        Ok(match ListOr::<u32>::deserialize(d)? {
            ListOr::List(v) => WorkerPartitions::Only(v),
            ListOr::One(n) => WorkerPartitions::Only(vec![n]),
            ListOr::Text(t) if t.trim() == "all" => WorkerPartitions::All,
            ListOr::Text(t) => WorkerPartitions::Only(
                t.split(',')
                    .map(|p| p.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| {
                        serde::de::Error::custom(format!(
                            "{t:?} is neither \"all\" nor a list of partition indexes"
                        ))
                    })?,
            ),
        })
    }

    pub fn serialize<S: Serializer>(v: &WorkerPartitions, s: S) -> Result<S::Ok, S::Error> {
        match v {
            WorkerPartitions::All => s.serialize_str("all"),
            WorkerPartitions::Only(v) => s.collect_seq(v),
        }
    }
}
