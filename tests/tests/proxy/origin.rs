//! A small origin server for the proxy's HTTP tests, listening in a lab namespace: it records
//! every request head it receives (what the origin saw is the assertion) and answers by path:
//!
//! - `/head`: the request head as the body;
//! - `/both`: a chunked body `hello` with a wrong `Content-Length: 3` beside it;
//! - `/once`: answers the first request on a connection, then closes the connection when the
//!   next request arrives, without answering (a server that dropped a kept connection);
//! - `/trailers`: a chunked body with a declared `X-Checksum` trailer, sent only when the
//!   request said `TE: trailers` (as a server may require);
//! - `/slow`: answers after 2 s;
//! - `/ws`: 101 Switching Protocols to `websocket`, then echoes whatever comes;
//! - `/conn`: `<peer address> <connection number>`, which TCP connection carried the request
//!   (numbered from 0 in accept order).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::support::in_namespace;

pub struct Origin {
    pub heads: Arc<Mutex<Vec<String>>>,
}

impl Origin {
    /// Listens on `address` inside namespace `ns`; serves until the test process ends.
    pub fn start(ns: &str, address: &str) -> Origin {
        let listener = in_namespace(ns, || TcpListener::bind(address).unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = heads.clone();
        std::thread::spawn(move || {
            for (number, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let recorded = recorded.clone();
                std::thread::spawn(move || serve(stream, number, &recorded));
            }
        });
        Origin { heads }
    }

    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
        if head.len() > 65_536 {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn serve(mut stream: TcpStream, number: usize, recorded: &Mutex<Vec<String>>) {
    // Longer than the proxy's pool keeps an idle connection, so a reused one shows.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut served = 0;
    while let Some(head) = read_head(&mut stream) {
        recorded.lock().unwrap().push(head.clone());
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let answer = match path.as_str() {
            "/both" => "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_string(),
            "/once" if served > 0 => return,
            "/slow" => {
                std::thread::sleep(Duration::from_secs(2));
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslow\n".to_string()
            }
            "/trailers" if head.to_lowercase().contains("te: trailers") => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: c0ffee\r\n\r\n".to_string(),
            "/trailers" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_string(),
            "/conn" => {
                let body = format!("{peer} {number}\n");
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            }
            "/ws" => {
                let switch = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                if stream.write_all(switch.as_bytes()).is_ok() {
                    let mut echo = stream.try_clone().unwrap();
                    let _ = std::io::copy(&mut stream, &mut echo);
                }
                return;
            }
            _ => format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{head}",
                head.len()
            ),
        };
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
        served += 1;
    }
}
