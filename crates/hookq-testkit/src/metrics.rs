//! Reading Prometheus text as hookq's `/metrics` writes it.

/// The value of the sample `series` (a name with its labels as written, e.g.
/// `hookq_worker_deliveries_total{source="s",outcome="delivered"}`), or
/// `None` when there is no such line.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Like [`value`], 0 when absent (a counter not incremented yet).
pub fn sample(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_by_name_and_labels() {
        let text = "# HELP x y\nx_total{a=\"1\"} 3\nx_total{a=\"10\"} 4\ny 2.5\n";
        assert_eq!(value(text, "x_total{a=\"1\"}"), Some(3.0));
        assert_eq!(value(text, "x_total{a=\"10\"}"), Some(4.0));
        assert_eq!(value(text, "y"), Some(2.5));
        assert_eq!(value(text, "z"), None);
        assert_eq!(sample(text, "z"), 0.0);
    }
}
