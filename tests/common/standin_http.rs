//! The HTTP/1.1 of the billing stand-ins (`stripe.rs`, `metronome.rs`): one request read from a
//! connection, one answer written to it. Enough for the real clients, which send one request
//! at a time per connection with a `content-length`.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

/// One request as read.
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// The next request on the connection; `None` once it is closed (or sends what is not HTTP).
pub async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await.ok()?;
    Some(Request { method, path, headers, body })
}

/// Writes an answer: `extra` holds further header lines, each ending in `\r\n`. `false` when
/// the caller is gone.
pub async fn write_answer(
    reader: &mut BufReader<TcpStream>,
    status: u16,
    content_type: &str,
    extra: &str,
    body: &str,
) -> bool {
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    reader.get_mut().write_all(response.as_bytes()).await.is_ok()
}
