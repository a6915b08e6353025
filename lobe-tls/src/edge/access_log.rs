//! The access log: one record per request (and per WebSocket or stream, written when it
//! ends), as a JSON line or in the NCSA common format.
//!
//! Writing never holds a request up: records go through a bounded channel to one writer
//! thread, which formats them, writes them in batches through a buffer and flushes each
//! batch at once, then lets the next gather for up to 100 ms. When the channel is full
//! the record is dropped and counted (`lobe_tls_access_log_dropped_total`). A file is reopened on demand (logrotate's
//! `postrotate`, through SIGUSR1 in `serve`).
//!
//! Credentials never reach a record: it holds no request header but `User-Agent` and
//! `Referer`, so `Authorization`, `Cookie`, `Set-Cookie`, `Proxy-Authorization` and API
//! keys stay out by construction.

use std::io::Write;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use super::config::{AccessLogFormat, AccessLogTarget};
use crate::error::{Error, Result};

/// Records waiting for the writer; beyond this they are dropped and counted.
const QUEUE: usize = 16 * 1024;

/// The writer's buffer: a batch is written in pieces of this size, then flushed.
const BUFFER: usize = 64 * 1024;

/// How long the writer lets lines gather after writing a batch: the most a line waits
/// for its write (nginx's `access_log ... flush=` does the same for a buffered log).
const PAUSE: Duration = Duration::from_millis(100);

/// What a connection's TLS session says, the same for each of its requests.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsFacts {
    /// `TLSv1.2`, `TLSv1.3`.
    pub version: Option<&'static str>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
}

impl TlsFacts {
    pub(crate) fn of(conn: &rustls::ServerConnection) -> Self {
        let version = conn.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "other",
        });
        TlsFacts {
            version,
            sni: conn.server_name().map(str::to_owned),
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
        }
    }
}

/// One line of the access log. Field names are a contract (collectors parse them): see
/// the README's table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Record {
    #[serde(serialize_with = "rfc3339_ms")]
    pub ts: SystemTime,
    pub request_id: String,
    pub client_ip: IpAddr,
    pub client_port: u16,
    pub method: String,
    pub host: Option<String>,
    pub path: String,
    pub proto: &'static str,
    pub tls_version: Option<&'static str>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub upstream_connect_ms: Option<f64>,
    pub upstream_ttfb_ms: Option<f64>,
    pub attempts: u32,
    pub site: Option<String>,
    pub upstream: Option<String>,
    pub affinity: Option<&'static str>,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
    pub upgrade: Option<&'static str>,
    /// When the request came, for `duration_ms`.
    #[serde(skip)]
    pub started: Instant,
    /// Counts a streamed request body as it passes (`bytes_in` when written).
    #[serde(skip)]
    pub bytes_in_counter: Option<Arc<AtomicU64>>,
}

/// Milliseconds with microseconds kept (3 decimals).
pub(crate) fn ms(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn rfc3339_ms<S: serde::Serializer>(ts: &SystemTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&utc(*ts, RFC3339_MS))
}

const RFC3339_MS: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
);

/// `10/Oct/2000:13:55:36 +0000`, as the common log format writes a time.
const CLF_TIME: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
);

fn utc(ts: SystemTime, format: &[time::format_description::BorrowedFormatItem<'_>]) -> String {
    time::OffsetDateTime::from(ts)
        .format(format)
        .unwrap_or_default()
}

impl Record {
    /// A record of `req` as it arrived, before routing; the later phases fill the rest.
    pub(crate) fn start<B>(
        req: &http::Request<B>,
        request_id: &str,
        client: std::net::SocketAddr,
        tls: &TlsFacts,
    ) -> Self {
        let text = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let proto = match req.version() {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        };
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| text(header::HOST));
        Record {
            ts: SystemTime::now(),
            request_id: request_id.to_owned(),
            client_ip: client.ip().to_canonical(),
            client_port: client.port(),
            method: req.method().as_str().to_owned(),
            host,
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
            proto,
            tls_version: tls.version,
            sni: tls.sni.clone(),
            alpn: tls.alpn.clone(),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0.0,
            upstream_connect_ms: None,
            upstream_ttfb_ms: None,
            attempts: 0,
            site: None,
            upstream: None,
            affinity: None,
            user_agent: text(header::USER_AGENT),
            referer: text(header::REFERER),
            upgrade: None,
            started: Instant::now(),
            bytes_in_counter: None,
        }
    }

    /// The line, newline included, in `format`.
    pub(crate) fn write_line(&self, format: AccessLogFormat, out: &mut Vec<u8>) {
        match format {
            AccessLogFormat::Json => {
                if serde_json::to_writer(&mut *out, self).is_ok() {
                    out.push(b'\n');
                }
            }
            AccessLogFormat::Common => {
                // host ident authuser [date] "request line" status bytes; the request
                // line is the client's, quotes and controls escaped as nginx does.
                let mut request = String::new();
                for part in [
                    self.method.as_str(),
                    " ",
                    self.path.as_str(),
                    " ",
                    self.proto,
                ] {
                    escape_into(&mut request, part);
                }
                let bytes = match self.bytes_out {
                    0 => "-".to_owned(),
                    n => n.to_string(),
                };
                let _ = writeln!(
                    out,
                    "{} - - [{}] \"{}\" {} {}",
                    self.client_ip,
                    utc(self.ts, CLF_TIME),
                    request,
                    self.status,
                    bytes
                );
            }
        }
    }
}

/// `text` with `"`, `\` and bytes outside printable ASCII as `\xHH`.
fn escape_into(out: &mut String, text: &str) {
    use std::fmt::Write as _;
    for b in text.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
}

enum Message {
    Line(Box<Record>),
    /// Wakes the writer to look at the reopen flag.
    Wake,
}

/// The access log's sending side: cheap to use from any request.
#[derive(Debug)]
pub(crate) struct AccessLog {
    sender: mpsc::Sender<Message>,
    dropped: Counter,
    reopen: Arc<AtomicBool>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Message")
    }
}

impl AccessLog {
    /// Opens `target` (a file: created 0640, appended to) and starts its writer thread,
    /// which ends when the last sender is dropped, after writing what it holds.
    pub(crate) fn start(
        target: &AccessLogTarget,
        format: AccessLogFormat,
        dropped: Counter,
    ) -> Result<Arc<Self>> {
        let sink = Sink::open(target)?;
        let (sender, receiver) = mpsc::channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            receiver,
            sink,
            target: target.clone(),
            format,
            reopen: reopen.clone(),
        };
        std::thread::Builder::new()
            .name("lobe-tls-access-log".into())
            .spawn(move || writer.run())
            .map_err(|e| Error::config(format!("cannot start the access log writer: {e}")))?;
        Ok(Arc::new(AccessLog {
            sender,
            dropped,
            reopen,
        }))
    }

    /// Queues `record`; drops (and counts) it when the writer is that far behind.
    pub(crate) fn write(&self, record: Box<Record>) {
        if self.sender.try_send(Message::Line(record)).is_err() {
            self.dropped.inc();
        }
    }

    /// Has a file reopened by its path (after logrotate moved it) before the next line.
    pub(crate) fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // A full queue wakes the writer anyway.
        let _ = self.sender.try_send(Message::Wake);
    }
}

/// A record on its way, with the log it goes to: written when dropped or finished.
#[derive(Debug)]
pub(crate) struct Pending {
    pub record: Box<Record>,
    log: Arc<AccessLog>,
}

impl Pending {
    pub(crate) fn new(record: Box<Record>, log: Arc<AccessLog>) -> Self {
        Pending { record, log }
    }

    /// Writes the record, its duration taken now.
    pub(crate) fn finish(mut self) {
        if let Some(counted) = self.record.bytes_in_counter.take() {
            self.record.bytes_in = counted.load(Ordering::Relaxed);
        }
        self.record.duration_ms = ms(self.record.started.elapsed());
        self.log.write(self.record);
    }
}

enum Sink {
    Stdout(std::io::Stdout),
    Stderr(std::io::Stderr),
    File(std::fs::File),
}

impl Sink {
    fn open(target: &AccessLogTarget) -> Result<Sink> {
        Ok(match target {
            AccessLogTarget::Stdout => Sink::Stdout(std::io::stdout()),
            AccessLogTarget::Stderr => Sink::Stderr(std::io::stderr()),
            AccessLogTarget::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)
                    .map_err(|e| Error::io(path, e))?;
                Sink::File(file)
            }
        })
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stdout(out) => out.write(buf),
            Sink::Stderr(out) => out.write(buf),
            Sink::File(out) => out.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout(out) => out.flush(),
            Sink::Stderr(out) => out.flush(),
            Sink::File(out) => out.flush(),
        }
    }
}

struct Writer {
    receiver: mpsc::Receiver<Message>,
    sink: Sink,
    target: AccessLogTarget,
    format: AccessLogFormat,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    /// Writes what comes, a batch at a time: everything queued, then a flush, then a
    /// pause of [`PAUSE`] while the next batch gathers. Without the pause a busy edge
    /// would wake this thread and write once per request (a cross-thread wake and a
    /// syscall each, a fifth of the edge's throughput here); with it, a line is out
    /// within [`PAUSE`] and a burst that fills half the queue is written at once.
    fn run(mut self) {
        let mut buffer = Vec::with_capacity(BUFFER);
        let mut failing = false;
        while let Some(first) = self.receiver.blocking_recv() {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(message) = next.take() {
                taken += 1;
                if let Message::Line(record) = message {
                    record.write_line(self.format, &mut buffer);
                }
                if buffer.len() >= BUFFER {
                    failing = self.flush(&mut buffer, failing);
                }
                next = self.receiver.try_recv().ok();
            }
            failing = self.flush(&mut buffer, failing);
            if self.reopen.swap(false, Ordering::AcqRel) {
                self.reopen_sink();
            }
            if taken < QUEUE / 2 {
                std::thread::sleep(PAUSE);
            }
        }
        let _ = self.flush(&mut buffer, failing);
    }

    /// Writes `buffer` out; an error is logged once until writing works again.
    fn flush(&mut self, buffer: &mut Vec<u8>, failing: bool) -> bool {
        if buffer.is_empty() {
            return failing;
        }
        let written = self.sink.write_all(buffer).and_then(|()| self.sink.flush());
        buffer.clear();
        match written {
            Ok(()) => false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot write the access log; lines are lost until it works again");
                }
                true
            }
        }
    }

    fn reopen_sink(&mut self) {
        if !matches!(self.target, AccessLogTarget::File(_)) {
            return;
        }
        match Sink::open(&self.target) {
            Ok(sink) => {
                self.sink = sink;
                tracing::info!("access log reopened");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reopen the access log; writing on to the old file")
            }
        }
    }
}

/// A request body that counts its bytes as they pass, for `bytes_in`.
pub(crate) struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub(crate) fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let req = http::Request::builder()
            .method("GET")
            .uri("/chat?room=a%22b")
            .header("host", "app.example.com")
            .header("user-agent", "curl/8 \"quoted\"")
            .header("referer", "https://app.example.com/")
            .header("authorization", "Bearer SECRET-TOKEN")
            .header("cookie", "session=SECRET-COOKIE")
            .body(())
            .unwrap();
        let tls = TlsFacts {
            version: Some("TLSv1.3"),
            sni: Some("app.example.com".into()),
            alpn: Some("http/1.1".into()),
        };
        let mut record = Record::start(&req, "abc", "127.0.0.7:5555".parse().unwrap(), &tls);
        // 2026-01-02T03:04:05.678Z
        record.ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
        record.status = 200;
        record.bytes_out = 1234;
        record
    }

    #[test]
    fn json_lines_carry_every_field_and_no_credential() {
        let mut out = Vec::new();
        record().write_line(AccessLogFormat::Json, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("SECRET"), "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let object = value.as_object().unwrap();
        for field in [
            "ts",
            "request_id",
            "client_ip",
            "client_port",
            "method",
            "host",
            "path",
            "proto",
            "tls_version",
            "sni",
            "alpn",
            "status",
            "bytes_in",
            "bytes_out",
            "duration_ms",
            "upstream_connect_ms",
            "upstream_ttfb_ms",
            "attempts",
            "site",
            "upstream",
            "affinity",
            "user_agent",
            "referer",
            "upgrade",
        ] {
            assert!(object.contains_key(field), "{field} missing in {text}");
        }
        assert_eq!(object.len(), 24, "{text}");
        assert_eq!(value["ts"], "2026-01-02T03:04:05.678Z");
        assert_eq!(value["client_ip"], "127.0.0.7");
        assert_eq!(value["client_port"], 5555);
        assert_eq!(value["path"], "/chat?room=a%22b");
        assert_eq!(value["proto"], "HTTP/1.1");
        assert_eq!(value["host"], "app.example.com");
        assert_eq!(value["user_agent"], "curl/8 \"quoted\"");
        assert_eq!(value["upstream_ttfb_ms"], serde_json::Value::Null);
        assert_eq!(value["upgrade"], serde_json::Value::Null);
    }

    #[test]
    fn common_lines_follow_the_ncsa_format() {
        let mut out = Vec::new();
        record().write_line(AccessLogFormat::Common, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "127.0.0.7 - - [02/Jan/2026:03:04:05 +0000] \"GET /chat?room=a%22b HTTP/1.1\" 200 1234\n"
        );
        let mut empty = record();
        empty.bytes_out = 0;
        let mut out = Vec::new();
        empty.write_line(AccessLogFormat::Common, &mut out);
        assert!(String::from_utf8(out).unwrap().ends_with("\" 200 -\n"));
    }

    #[test]
    fn common_request_lines_escape_quotes_and_controls() {
        let mut out = String::new();
        escape_into(&mut out, "a\"b\\c\x01\u{e9}");
        assert_eq!(out, "a\\x22b\\x5Cc\\x01\\xC3\\xA9");
    }

    #[test]
    fn durations_are_milliseconds_to_the_microsecond() {
        assert_eq!(ms(Duration::from_micros(1_234_567)), 1234.567);
        assert_eq!(ms(Duration::ZERO), 0.0);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dropped = Counter::default();
        let (sender, _receiver) = mpsc::channel(1);
        let log = AccessLog {
            sender,
            dropped: dropped.clone(),
            reopen: Arc::new(AtomicBool::new(false)),
        };
        log.write(Box::new(record()));
        log.write(Box::new(record()));
        log.write(Box::new(record()));
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn a_file_is_written_and_reopened_after_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(
            &AccessLogTarget::File(path.clone()),
            AccessLogFormat::Json,
            Counter::default(),
        )
        .unwrap();
        let wait_lines = |path: &std::path::Path, n: usize| {
            for _ in 0..500 {
                let lines = std::fs::read_to_string(path)
                    .unwrap_or_default()
                    .lines()
                    .count();
                if lines >= n {
                    return lines;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            0
        };
        log.write(Box::new(record()));
        assert_eq!(wait_lines(&path, 1), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert!(mode == 0o640 || mode == 0o600 || mode == 0o644, "{mode:o}");
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        // The reopen happens after the batch the wake-up belongs to.
        for _ in 0..500 {
            if path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log.write(Box::new(record()));
        assert_eq!(wait_lines(&path, 1), 1);
        assert_eq!(wait_lines(&rotated, 1), 1);
    }
}
