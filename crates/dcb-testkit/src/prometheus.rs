//! Reading Prometheus text from a metrics endpoint, for tests and examples of the store's
//! metrics.
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `http://{addr}/metrics` and returns the body (plain HTTP/1.0, no client library).
pub async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!(
            "unexpected response from {addr}: {}",
            response.lines().next().unwrap_or_default()
        ))),
    }
}

/// The sum of every sample of `name` (for a histogram: `name_count`, `name_sum`, ...) whose
/// labels include all of `labels` (`key="value"` pairs as Prometheus writes them).
///
/// ```
/// let text = "crablet_conflicts_total{backend=\"memory\",operation=\"append_if\"} 3\n";
/// let value = dcb_testkit::prometheus::sample(text, "crablet_conflicts_total", &[("backend", "memory")]);
/// assert_eq!(value, Some(3.0));
/// ```
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => continue,
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let wanted = labels.iter().all(|(k, v)| {
            series_labels
                .split(',')
                .any(|l| l == format!("{k}=\"{v}\""))
        });
        if let (true, Ok(value)) = (wanted, value.parse::<f64>()) {
            found = Some(found.unwrap_or(0.0) + value);
        }
    }
    found
}
