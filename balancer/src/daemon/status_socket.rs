//! The status socket: answers `status` with the daemon's status document, the health figures
//! merged in at the moment of the question.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

use super::HealthFigures;
use crate::state::{STATUS_VERSION, Status};

pub(super) async fn serve_status(
    listener: UnixListener,
    status: Arc<Mutex<Status>>,
    figures: HealthFigures,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        let figures = figures.clone();
        tokio::spawn(async move {
            let (reader, mut writer) = stream.into_split();
            let mut request = String::new();
            // A request is one short line; never buffer more than that from a client.
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(reader, 256));
            let read = reader.read_line(&mut request);
            if tokio::time::timeout(Duration::from_secs(2), read)
                .await
                .is_err()
            {
                return;
            }
            let answer = match request.trim() {
                "" | "status" => {
                    let mut document = status.lock().ok().map(|s| s.clone());
                    if let (Some(document), Ok(figures)) = (document.as_mut(), figures.lock()) {
                        for uplink in &mut document.uplinks {
                            uplink.health = figures.get(&uplink.id).cloned();
                        }
                    }
                    document
                        .and_then(|d| serde_json::to_string(&d).ok())
                        .unwrap_or_else(|| r#"{"error":"status unavailable"}"#.to_string())
                }
                other => serde_json::json!({ "version": STATUS_VERSION, "error": format!("unknown request {other:?}") })
                    .to_string(),
            };
            let _ = writer.write_all(answer.as_bytes()).await;
            let _ = writer.write_all(b"\n").await;
            let _ = writer.shutdown().await;
        });
    }
}
