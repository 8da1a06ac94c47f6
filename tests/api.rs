//! The HTTP API end to end: a server on a Unix socket in a temp dir over the
//! fake backend, a hand-written HTTP/1.1 client, and every answer checked
//! against docs/openapi.yaml (the status is documented for the operation, and
//! the body has the documented required fields, types and enum values).
//! Event streams (server-sent events) are read incrementally over the same
//! socket, and each event's data is checked against the documented schema.

use blockfence::api::fake::FakeBackend;
use blockfence::api::{Command, ServeConfig, ServeError, Server, VolumeEvent, VolumeEventKind};
use blockfence::metrics::Metrics;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};

/// A guard against hangs only: every wait below ends on an event long before.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The path template of the event stream.
const EVENTS: &str = "/v1/volumes/{volume}/events";

const OPENAPI: &str = include_str!("../docs/openapi.yaml");

#[derive(Debug)]
struct Response {
    status: u16,
    content_type: String,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// One HTTP/1.1 request over any stream; `Connection: close`, so the answer
/// ends at EOF.
async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    body: Option<&str>,
    content_type: Option<&str>,
) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut content_type = String::new();
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-type" => content_type = value.trim().to_string(),
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Response {
        status,
        content_type,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// One server-sent event.
#[derive(Debug)]
struct SseEvent {
    event: String,
    data: String,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

/// An event stream whose response head has been read.
struct EventStream {
    reader: BufReader<UnixStream>,
    /// Body text received but not yet split into events.
    buffer: String,
    ended: bool,
}

/// Open an event stream: `Ok` with the stream (and its head, as a bodiless
/// response for [`Doc::check`]) on 200, `Err` with the full answer otherwise.
async fn open_events(socket: &Path, volume: &str) -> Result<(Response, EventStream), Response> {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    let req = format!(
        "GET /v1/volumes/{volume}/events HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(HANG_GUARD, reader.read_line(&mut line))
            .await
            .expect("the response head arrives")
            .unwrap();
        assert!(n > 0, "EOF inside the response head: {head:?}");
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut content_type = String::new();
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-type" => content_type = value.trim().to_string(),
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    if status != 200 {
        let mut rest = String::new();
        reader.read_to_string(&mut rest).await.unwrap();
        let body = if chunked { dechunk(&rest) } else { rest };
        return Err(Response {
            status,
            content_type,
            body,
        });
    }
    assert!(chunked, "an event stream is sent chunked");
    let head = Response {
        status,
        content_type,
        body: String::new(),
    };
    Ok((
        head,
        EventStream {
            reader,
            buffer: String::new(),
            ended: false,
        },
    ))
}

impl EventStream {
    /// The next event (keep-alive comments skipped), or `None` once the
    /// stream has ended.
    async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(HANG_GUARD, self.next_unguarded())
            .await
            .expect("an event or the end of the stream")
    }

    async fn next_unguarded(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut event = None;
                let mut data = Vec::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim_start().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.trim_start().to_string());
                    } else {
                        assert!(line.is_empty() || line.starts_with(':'), "{line:?}");
                    }
                }
                if let Some(event) = event {
                    return Some(SseEvent {
                        event,
                        data: data.join("\n"),
                    });
                }
                assert!(data.is_empty(), "data without an event name: {frame:?}");
            }
            if self.ended {
                assert!(self.buffer.is_empty(), "a partial event: {:?}", self.buffer);
                return None;
            }
            // One chunk: size line, bytes, CRLF.
            let mut size = String::new();
            if self.reader.read_line(&mut size).await.unwrap() == 0 {
                self.ended = true;
                continue;
            }
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).await.unwrap();
            if size == 0 {
                self.ended = true;
            }
            chunk.truncate(size);
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// The OpenAPI document, and which operations the answers seen so far cover.
struct Doc {
    doc: Value,
    seen: Mutex<BTreeSet<(String, String)>>,
}

impl Doc {
    fn load() -> Doc {
        Doc {
            doc: serde_yaml::from_str(OPENAPI).expect("docs/openapi.yaml parses"),
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').expect("local $ref");
                self.resolve(
                    self.doc
                        .pointer(pointer)
                        .unwrap_or_else(|| panic!("dangling $ref {r}")),
                )
            }
            None => v,
        }
    }

    /// Panics unless `resp` is a documented answer of `method template`.
    fn check(&self, method: &str, template: &str, resp: &Response) {
        let m = method.to_ascii_lowercase();
        let op = self
            .doc
            .pointer(&format!("/paths/{}/{m}", template.replace('/', "~1")))
            .unwrap_or_else(|| panic!("{method} {template} is not in docs/openapi.yaml"));
        let documented = op["responses"]
            .get(resp.status.to_string())
            .unwrap_or_else(|| {
                panic!(
                    "{method} {template} answered {} which docs/openapi.yaml does not list: {}",
                    resp.status, resp.body
                )
            });
        let documented = self.resolve(documented);
        let content = documented["content"].as_object().expect("content");
        let (media, spec) = content.iter().next().expect("one media type");
        assert!(
            resp.content_type.starts_with(media.as_str()),
            "{method} {template}: content type {:?}, documented {media}",
            resp.content_type
        );
        if media == "application/json" {
            let body = resp.json();
            if let Err(e) = self.validate(&spec["schema"], &body) {
                panic!("{method} {template} {}: {e}; body {body}", resp.status);
            }
        }
        self.seen.lock().unwrap().insert((m, template.to_string()));
    }

    /// Panics unless `event` is documented: its data matches the event
    /// schema, and its `event` field is the SSE event name.
    fn check_event(&self, event: &SseEvent) -> Value {
        let data = event.json();
        let schema = json!({"$ref": "#/components/schemas/StreamEvent"});
        if let Err(e) = self.validate(&schema, &data) {
            panic!("event {}: {e}; data {data}", event.event);
        }
        assert_eq!(data["event"], event.event.as_str(), "{data}");
        data
    }

    /// A small schema check: $ref, allOf, oneOf, type, nullable, enum,
    /// required, properties, items, additionalProperties: false.
    fn validate(&self, schema: &Value, v: &Value) -> Result<(), String> {
        let schema = self.resolve(schema);
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.validate(s, v)?;
            }
        }
        if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
            let matching = one.iter().filter(|s| self.validate(s, v).is_ok()).count();
            if matching != 1 {
                return Err(format!("{v} matches {matching} of the oneOf schemas"));
            }
        }
        if let (Some(false), Some(obj)) = (
            schema.get("additionalProperties").and_then(Value::as_bool),
            v.as_object(),
        ) {
            let props = schema.get("properties").and_then(Value::as_object);
            for name in obj.keys() {
                if !props.is_some_and(|p| p.contains_key(name)) {
                    return Err(format!("field {name:?} is not documented"));
                }
            }
        }
        if v.is_null() && schema["nullable"] == json!(true) {
            return Ok(());
        }
        if let Some(values) = schema.get("enum").and_then(Value::as_array) {
            if !values.contains(v) {
                return Err(format!("{v} is not one of {values:?}"));
            }
        }
        let ok = match schema.get("type").and_then(Value::as_str) {
            None => true,
            Some("object") => v.is_object(),
            Some("array") => v.is_array(),
            Some("string") => v.is_string(),
            Some("integer") => v.is_u64() || v.is_i64(),
            Some("number") => v.is_number(),
            Some("boolean") => v.is_boolean(),
            Some(t) => return Err(format!("unknown type {t}")),
        };
        if !ok {
            return Err(format!("{v} is not of type {}", schema["type"]));
        }
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for field in required {
                let field = field.as_str().unwrap();
                if v.get(field).is_none() {
                    return Err(format!("required field {field:?} is missing"));
                }
            }
        }
        if let (Some(props), Some(obj)) = (
            schema.get("properties").and_then(Value::as_object),
            v.as_object(),
        ) {
            for (name, s) in props {
                if let Some(value) = obj.get(name) {
                    self.validate(s, value)
                        .map_err(|e| format!("field {name:?}: {e}"))?;
                }
            }
        }
        if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
            for item in arr {
                self.validate(items, item)?;
            }
        }
        Ok(())
    }

    fn documented_operations(&self) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if method != "parameters" {
                    ops.insert((method.clone(), path.clone()));
                }
            }
        }
        ops
    }
}

/// A server over a fake backend with volumes `vol-a` and `vol-b`.
struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    server: Option<Server>,
    doc: Doc,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let metrics = Arc::new(Metrics::new());
        let commands = FakeBackend::new(["vol-a", "vol-b"])
            .with_metrics(metrics.clone())
            .spawn();
        let server = Server::start(
            &ServeConfig {
                socket: socket.clone(),
                tcp: None,
            },
            commands,
            metrics.clone(),
        )
        .await
        .unwrap();
        Harness {
            _dir: dir,
            socket,
            server: Some(server),
            doc: Doc::load(),
        }
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        ct: Option<&str>,
    ) -> Response {
        let stream = UnixStream::connect(&self.socket).await.unwrap();
        http(stream, method, path, body, ct).await
    }

    /// A request whose answer must be documented for `template`.
    async fn call(
        &self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
    ) -> Response {
        let body = body.map(|b| b.to_string());
        let ct = body.as_ref().map(|_| "application/json");
        let resp = self.raw(method, path, body.as_deref(), ct).await;
        self.doc.check(method, template, &resp);
        resp
    }

    /// A request with a raw JSON body text.
    async fn call_text(&self, template: &str, path: &str, body: &str) -> Response {
        let resp = self
            .raw("POST", path, Some(body), Some("application/json"))
            .await;
        self.doc.check("POST", template, &resp);
        resp
    }

    async fn acquire(&self, volume: &str, holder: &str, timeout: f64) -> Response {
        self.call(
            "POST",
            "/v1/volumes/{volume}/acquire",
            &format!("/v1/volumes/{volume}/acquire"),
            Some(json!({"holder": holder, "timeout_seconds": timeout})),
        )
        .await
    }

    async fn release(&self, volume: &str, session: &str) -> Response {
        self.call(
            "POST",
            "/v1/volumes/{volume}/release",
            &format!("/v1/volumes/{volume}/release"),
            Some(json!({ "session": session })),
        )
        .await
    }

    async fn volume(&self, volume: &str) -> Response {
        self.call(
            "GET",
            "/v1/volumes/{volume}",
            &format!("/v1/volumes/{volume}"),
            None,
        )
        .await
    }

    async fn stop(mut self) {
        self.server.take().unwrap().shutdown().await.unwrap();
        assert!(!self.socket.exists(), "shutdown removes the socket");
    }
}

fn assert_error(resp: &Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status, status, "body: {}", resp.body);
    let body = resp.json();
    assert_eq!(body["error"], code, "body: {body}");
    assert!(
        !body["message"].as_str().unwrap().is_empty(),
        "message says what is wrong"
    );
    body
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let h = Harness::start().await;

    let r = h.call("GET", "/livez", "/livez", None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = h.call("GET", "/readyz", "/readyz", None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = h.call("GET", "/metrics", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("\nblockfence_build_info{version=\""),
        "{:?}",
        r.body
    );
    // Subscribed before anything happens: the stream sees all of it.
    let (head, mut events) = open_events(&h.socket, "vol-a").await.unwrap();
    h.doc.check("GET", EVENTS, &head);

    let r = h.call("GET", "/v1/volumes", "/v1/volumes", None).await;
    assert_eq!(r.status, 200);
    let list = r.json();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volume"].clone())
        .collect();
    assert_eq!(names, vec![json!("vol-a"), json!("vol-b")]);
    assert_eq!(list[0]["state"], "free");
    assert_eq!(list[0]["holder"], Value::Null);
    assert_eq!(list[0]["generation"], 0);

    let grant = h.acquire("vol-a", "pod-1", 5.0).await;
    assert_eq!(grant.status, 200, "{}", grant.body);
    let grant = grant.json();
    assert_eq!(grant["generation"], 1);
    assert_eq!(grant["device"], "/dev/fake/vol-a");
    assert!(grant["mount_options"]
        .as_array()
        .unwrap()
        .contains(&json!("errors=remount-ro")));
    assert!(grant["valid_for_ms"].as_u64().unwrap() > 0);
    let session = grant["session"].as_str().unwrap().to_string();

    let v = h.volume("vol-a").await.json();
    assert_eq!(v["state"], "held");
    assert_eq!(v["holder"], "pod-1");
    assert_eq!(v["fence_state"], "armed");
    assert!(v["since_renewal_ms"].is_u64());

    let r = h
        .call(
            "POST",
            "/v1/sessions/{session}/keepalive",
            &format!("/v1/sessions/{session}/keepalive"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["session"], session.as_str());
    assert_eq!(r.json()["generation"], 1);

    // Mount: the fake mounts nothing (503); a bad target is 400 first.
    let r = h
        .call(
            "POST",
            "/v1/volumes/{volume}/mount",
            "/v1/volumes/vol-a/mount",
            Some(json!({"session": session, "target": "/var/lib/pg"})),
        )
        .await;
    assert_error(&r, 503, "unavailable");
    let r = h
        .call(
            "POST",
            "/v1/volumes/{volume}/mount",
            "/v1/volumes/vol-a/mount",
            Some(json!({"session": session, "target": "var/lib/pg"})),
        )
        .await;
    assert_error(&r, 400, "bad_request");

    let r = h.release("vol-a", &session).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "free");
    assert_eq!(r.json()["fence_state"], "idle");
    assert_eq!(r.json()["holder"], Value::Null);

    let grant = h.acquire("vol-a", "pod-2", 0.0).await.json();
    assert_eq!(grant["generation"], 2);
    let session = grant["session"].as_str().unwrap().to_string();
    let r = h
        .call(
            "POST",
            "/v1/volumes/{volume}/handover",
            "/v1/volumes/vol-a/handover",
            Some(json!({"to_node": "node-b"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (&v["holder"], &v["generation"], &v["fence_state"]),
        (&json!("node-b"), &json!(3), &json!("idle"))
    );
    // The handed-over session is gone.
    let r = h
        .call(
            "POST",
            "/v1/sessions/{session}/keepalive",
            &format!("/v1/sessions/{session}/keepalive"),
            None,
        )
        .await;
    assert_error(&r, 404, "unknown_session");

    // The metrics the server was given follow the fake backend.
    let r = h.call("GET", "/metrics", "/metrics", None).await;
    for line in [
        r#"blockfence_lease_generation{volume="vol-a"} 3"#,
        r#"blockfence_lease_state{state="free",volume="vol-a"} 1"#,
        r#"blockfence_lease_state{state="held",volume="vol-b"} 0"#,
    ] {
        assert!(r.body.lines().any(|l| l == line), "{line} in {}", r.body);
    }

    // Everything that happened to vol-a, in order.
    let mut kinds = Vec::new();
    for _ in 0..5 {
        let e = events.next().await.expect("the stream stays open");
        let data = h.doc.check_event(&e);
        assert_eq!(data["volume"], "vol-a");
        kinds.push(serde_json::from_value::<VolumeEvent>(data).unwrap().kind);
    }
    assert!(
        matches!(
            &kinds[..],
            [
                VolumeEventKind::Granted { holder: h1, generation: 1, .. },
                VolumeEventKind::Released { generation: 1 },
                VolumeEventKind::Granted { holder: h2, generation: 2, session: s2 },
                VolumeEventKind::HandoverRequested { session: s3, to_node },
                VolumeEventKind::Released { generation: 2 },
            ] if h1 == "pod-1" && h2 == "pod-2" && s2 == &session && s3 == &session && to_node == "node-b"
        ),
        "{kinds:?}"
    );
    drop(events);

    let seen = h.doc.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        h.doc.documented_operations(),
        "every documented operation was exercised"
    );
    h.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_400_with_a_json_reason() {
    let h = Harness::start().await;
    let acquire = "/v1/volumes/{volume}/acquire";
    let path = "/v1/volumes/vol-a/acquire";
    let cases: &[(&str, &str)] = &[
        ("{", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1]", "wrong fields or types"),
        (r#"{"timeout_seconds": 1}"#, "holder"),
        (r#"{"holder": "p"}"#, "timeout_seconds"),
        (r#"{"holder": 7, "timeout_seconds": 1}"#, "holder"),
        (
            r#"{"holder": "p", "timeout_seconds": "1"}"#,
            "timeout_seconds",
        ),
        (
            r#"{"holder": "p", "timeout_seconds": -1}"#,
            "timeout_seconds",
        ),
        (
            r#"{"holder": "p", "timeout_seconds": -0.001}"#,
            "timeout_seconds",
        ),
        (
            r#"{"holder": "p", "timeout_seconds": NaN}"#,
            "not valid JSON",
        ),
        (
            r#"{"holder": "p", "timeout_seconds": 1e400}"#,
            "timeout_seconds",
        ),
        (
            r#"{"holder": "p", "timeout_seconds": 3601}"#,
            "timeout_seconds",
        ),
        (r#"{"holder": "", "timeout_seconds": 1}"#, "holder"),
        (r#"{"holder": "a b", "timeout_seconds": 1}"#, "holder"),
        (
            r#"{"holder": "p", "timeout_seconds": 1, "x": 1}"#,
            "unknown field",
        ),
    ];
    for (body, says) in cases {
        let r = h.call_text(acquire, path, body).await;
        let e = assert_error(&r, 400, "bad_request");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(says),
            "body {body:?}: message {message:?} should mention {says:?}"
        );
    }
    // No content type.
    let r = h
        .raw(
            "POST",
            path,
            Some(r#"{"holder":"p","timeout_seconds":1}"#),
            None,
        )
        .await;
    h.doc.check("POST", acquire, &r);
    assert!(assert_error(&r, 400, "bad_request")["message"]
        .as_str()
        .unwrap()
        .contains("Content-Type"));
    // Missing and wrong fields on the other bodies.
    let r = h
        .call_text(
            "/v1/volumes/{volume}/release",
            "/v1/volumes/vol-a/release",
            "{}",
        )
        .await;
    assert_error(&r, 400, "bad_request");
    let r = h
        .call_text(
            "/v1/volumes/{volume}/handover",
            "/v1/volumes/vol-a/handover",
            r#"{"to_node": null}"#,
        )
        .await;
    assert_error(&r, 400, "bad_request");
    // A volume name with characters names may not have.
    let r = h.volume("vol%20a").await;
    assert_error(&r, 400, "bad_request");
    // Nothing above changed anything.
    assert_eq!(h.volume("vol-a").await.json()["state"], "free");
    h.stop().await;
}

#[tokio::test]
async fn unknown_volumes_sessions_paths_and_methods() {
    let h = Harness::start().await;
    assert_error(&h.volume("nope").await, 404, "unknown_volume");
    let r = open_events(&h.socket, "nope")
        .await
        .err()
        .expect("no stream for an unknown volume");
    h.doc.check("GET", EVENTS, &r);
    assert_error(&r, 404, "unknown_volume");
    let r = open_events(&h.socket, "no%20pe")
        .await
        .err()
        .expect("a bad name");
    h.doc.check("GET", EVENTS, &r);
    assert_error(&r, 400, "bad_request");
    assert_error(&h.acquire("nope", "p", 1.0).await, 404, "unknown_volume");
    assert_error(&h.release("nope", "s").await, 404, "unknown_volume");
    let r = h
        .call(
            "POST",
            "/v1/volumes/{volume}/handover",
            "/v1/volumes/nope/handover",
            Some(json!({"to_node": "node-b"})),
        )
        .await;
    assert_error(&r, 404, "unknown_volume");
    let r = h
        .call(
            "POST",
            "/v1/sessions/{session}/keepalive",
            "/v1/sessions/no-such-session/keepalive",
            None,
        )
        .await;
    assert_error(&r, 404, "unknown_session");
    assert_error(
        &h.release("vol-a", "no-such-session").await,
        404,
        "unknown_session",
    );

    for path in ["/", "/v1", "/v1/volumes/vol-a/nothing", "/v2/volumes"] {
        let r = h.raw("GET", path, None, None).await;
        assert!(r.content_type.starts_with("application/json"), "{path}");
        assert_error(&r, 404, "not_found");
    }
    let r = h.raw("GET", "/v1/volumes/vol-a/acquire", None, None).await;
    assert!(r.content_type.starts_with("application/json"));
    assert_error(&r, 405, "method_not_allowed");

    // A held volume handed over: fine; a free one: 409 not_held.
    let r = h
        .call(
            "POST",
            "/v1/volumes/{volume}/handover",
            "/v1/volumes/vol-b/handover",
            Some(json!({"to_node": "node-b"})),
        )
        .await;
    assert_error(&r, 409, "not_held");
    h.stop().await;
}

#[tokio::test]
async fn acquire_of_a_held_volume_times_out_naming_the_holder() {
    let h = Harness::start().await;
    let first = h.acquire("vol-a", "pod-1", 0.0).await;
    assert_eq!(first.status, 200);

    // Without waiting, and after waiting 200 ms.
    for timeout in [0.0, 0.2] {
        let started = std::time::Instant::now();
        let r = h.acquire("vol-a", "pod-2", timeout).await;
        let e = assert_error(&r, 409, "held");
        assert_eq!(e["holder"], "pod-1");
        assert!(e["message"].as_str().unwrap().contains("pod-1"));
        assert!(started.elapsed().as_secs_f64() >= timeout);
    }
    // The other volume is unaffected.
    assert_eq!(h.acquire("vol-b", "pod-2", 0.0).await.status, 200);
    let v = h.volume("vol-a").await.json();
    assert_eq!(
        (&v["holder"], &v["generation"]),
        (&json!("pod-1"), &json!(1))
    );
    h.stop().await;
}

#[tokio::test]
async fn release_frees_the_volume_for_a_waiting_acquire() {
    let h = std::sync::Arc::new(Harness::start().await);
    let first = h.acquire("vol-a", "pod-1", 0.0).await.json();
    let session = first["session"].as_str().unwrap().to_string();
    let other = h.acquire("vol-b", "pod-9", 0.0).await.json();

    // A session of another volume does not release this one.
    let r = h.release("vol-a", other["session"].as_str().unwrap()).await;
    assert_error(&r, 409, "session_mismatch");

    // pod-2 waits (or, if the release wins the race, is granted at once: the
    // outcome is the same either way).
    let waiter = {
        let h = h.clone();
        tokio::spawn(async move { h.acquire("vol-a", "pod-2", 60.0).await })
    };
    let r = h.release("vol-a", &session).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let second = waiter.await.unwrap();
    assert_eq!(second.status, 200, "{}", second.body);
    let second = second.json();
    assert_eq!(second["generation"], 2);
    assert_ne!(second["session"], first["session"]);
    assert_eq!(h.volume("vol-a").await.json()["holder"], "pod-2");
    // The old session is gone.
    assert_error(&h.release("vol-a", &session).await, 404, "unknown_session");

    let h = std::sync::Arc::into_inner(h).expect("the waiter task has finished");
    h.stop().await;
}

#[tokio::test]
async fn readyz_fails_while_the_backend_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let doc = Doc::load();

    // A backend that has stopped.
    let (tx, rx) = mpsc::channel::<Command>(1);
    drop(rx);
    let socket = dir.path().join("stopped.sock");
    let server = start(&socket, tx).await;
    let r = http(
        UnixStream::connect(&socket).await.unwrap(),
        "GET",
        "/readyz",
        None,
        None,
    )
    .await;
    doc.check("GET", "/readyz", &r);
    assert_error(&r, 503, "unavailable");
    let r = http(
        UnixStream::connect(&socket).await.unwrap(),
        "GET",
        "/v1/volumes",
        None,
        None,
    )
    .await;
    doc.check("GET", "/v1/volumes", &r);
    assert_error(&r, 503, "unavailable");
    let r = http(
        UnixStream::connect(&socket).await.unwrap(),
        "GET",
        "/livez",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "livez depends on nothing");
    server.shutdown().await.unwrap();

    // A backend that takes commands and never answers: the probe times out.
    let (tx, _rx) = mpsc::channel::<Command>(8);
    let socket = dir.path().join("silent.sock");
    let server = start(&socket, tx).await;
    let r = http(
        UnixStream::connect(&socket).await.unwrap(),
        "GET",
        "/readyz",
        None,
        None,
    )
    .await;
    assert_error(&r, 503, "unavailable");
    server.shutdown().await.unwrap();
}

async fn start(socket: &Path, commands: mpsc::Sender<Command>) -> Server {
    Server::start(
        &ServeConfig {
            socket: socket.to_path_buf(),
            tcp: None,
        },
        commands,
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn socket_handling() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");

    // A stale socket (its listener is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = start(&socket, FakeBackend::new(["v"]).spawn()).await;
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let r = http(
        UnixStream::connect(&socket).await.unwrap(),
        "GET",
        "/livez",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200);

    // A live one is not.
    let config = ServeConfig {
        socket: socket.clone(),
        tcp: None,
    };
    let err = Server::start(
        &config,
        FakeBackend::new(["v"]).spawn(),
        Arc::new(Metrics::new()),
    )
    .await
    .err()
    .expect("a second server on the same socket is refused");
    assert!(matches!(err, ServeError::SocketInUse { .. }), "{err}");
    // ...and the refused start left the first server working.
    let r = http(
        UnixStream::connect(&socket).await.unwrap(),
        "GET",
        "/livez",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    server.shutdown().await.unwrap();
    assert!(!socket.exists());

    // Something that is not a socket is never removed.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let err = Server::start(
        &ServeConfig {
            socket: file.clone(),
            tcp: None,
        },
        FakeBackend::new(["v"]).spawn(),
        Arc::new(Metrics::new()),
    )
    .await
    .err()
    .expect("a regular file at the socket path is refused");
    assert!(matches!(err, ServeError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[tokio::test]
async fn tcp_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"] {
        let socket = dir.path().join("refused.sock");
        let err = Server::start(
            &ServeConfig {
                socket: socket.clone(),
                tcp: Some(addr.parse().unwrap()),
            },
            FakeBackend::new(["v"]).spawn(),
            Arc::new(Metrics::new()),
        )
        .await
        .err()
        .expect("a non-loopback address is refused");
        assert!(matches!(err, ServeError::NotLoopback { .. }), "{err}");
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(!socket.exists(), "a refused start leaves no socket");
    }

    let server = Server::start(
        &ServeConfig {
            socket: dir.path().join("api.sock"),
            tcp: Some("127.0.0.1:0".parse().unwrap()),
        },
        FakeBackend::new(["vol-a"]).spawn(),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let addr = server.tcp_addr().unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let r = http(stream, "GET", "/v1/volumes/vol-a", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["volume"], "vol-a");
    // A mount over TCP: no process to mount for.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json!({"session": "0-abc", "target": "/mnt"}).to_string();
    let r = http(
        stream,
        "POST",
        "/v1/volumes/vol-a/mount",
        Some(&body),
        Some("application/json"),
    )
    .await;
    assert_error(&r, 403, "caller_unknown");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("Unix socket"));
    server.shutdown().await.unwrap();
}

/// The router served without connect info (as a test or another server
/// may): the caller is unknown, so a mount is 403; a bad target is 400
/// before that.
#[tokio::test]
async fn a_mount_without_a_known_caller_is_403_and_a_relative_target_400() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("plain.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let app = blockfence::api::router(
        FakeBackend::new(["vol-a"]).spawn(),
        Arc::new(Metrics::new()),
    );
    let served = tokio::spawn(async move { axum::serve(listener, app).await });
    let doc = Doc::load();
    let mount = |body: Value| {
        let socket = socket.clone();
        async move {
            let stream = UnixStream::connect(&socket).await.unwrap();
            let body = body.to_string();
            http(
                stream,
                "POST",
                "/v1/volumes/vol-a/mount",
                Some(&body),
                Some("application/json"),
            )
            .await
        }
    };
    let template = "/v1/volumes/{volume}/mount";
    let r = mount(json!({"session": "0-abc", "target": "/mnt/pg"})).await;
    doc.check("POST", template, &r);
    assert_error(&r, 403, "caller_unknown");
    for target in ["mnt/pg", "/mnt/../etc", ""] {
        let r = mount(json!({"session": "0-abc", "target": target})).await;
        doc.check("POST", template, &r);
        assert_error(&r, 400, "bad_request");
    }
    served.abort();
}

#[tokio::test]
async fn an_event_stream_reports_acquire_and_release_then_ends_on_shutdown() {
    let h = Harness::start().await;
    let (_, mut events) = open_events(&h.socket, "vol-b").await.unwrap();
    let grant = h.acquire("vol-b", "pod-1", 0.0).await.json();
    let session = grant["session"].as_str().unwrap();
    // Another volume's events are not on this stream.
    let other = h.acquire("vol-a", "pod-9", 0.0).await.json();
    assert_eq!(h.release("vol-b", session).await.status, 200);

    let e = events.next().await.unwrap();
    assert_eq!(e.event, "granted");
    let data = h.doc.check_event(&e);
    assert_eq!(
        data,
        json!({"volume": "vol-b", "event": "granted", "session": session,
               "holder": "pod-1", "generation": 1})
    );
    let e = events.next().await.unwrap();
    assert_eq!(e.event, "released");
    assert_eq!(
        h.doc.check_event(&e),
        json!({"volume": "vol-b", "event": "released", "generation": 1})
    );
    assert_eq!(
        h.release("vol-a", other["session"].as_str().unwrap())
            .await
            .status,
        200
    );

    // A graceful shutdown does not wait for subscribers: it ends their streams.
    tokio::time::timeout(HANG_GUARD, h.stop())
        .await
        .expect("shutdown ends open event streams");
    assert!(events.next().await.is_none(), "the stream has ended");
}

#[tokio::test]
async fn a_subscriber_that_fell_behind_is_told_how_many_events_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let doc = Doc::load();
    // A backend that answers Subscribe with a receiver that has already
    // missed three of five events (the channel holds two), then goes away.
    let (tx, mut rx) = mpsc::channel::<Command>(1);
    let backend = tokio::spawn(async move {
        while let Some(command) = rx.recv().await {
            if let Command::Subscribe { volume, reply } = command {
                let (events, receiver) = broadcast::channel(2);
                for generation in 1..=5 {
                    events
                        .send(VolumeEvent {
                            volume: volume.clone(),
                            kind: VolumeEventKind::Released { generation },
                        })
                        .unwrap();
                }
                reply.send(Ok(receiver)).unwrap();
            }
        }
    });
    let socket = dir.path().join("lag.sock");
    let server = start(&socket, tx).await;
    let (_, mut events) = open_events(&socket, "v").await.unwrap();

    let e = events.next().await.unwrap();
    assert_eq!(e.event, "lagged");
    assert_eq!(
        doc.check_event(&e),
        json!({"volume": "v", "event": "lagged", "missed": 3})
    );
    for generation in [4, 5] {
        let e = events.next().await.unwrap();
        assert_eq!(e.event, "released");
        assert_eq!(doc.check_event(&e)["generation"], generation);
    }
    // The backend dropped its sender: the stream ends.
    assert!(events.next().await.is_none());
    server.shutdown().await.unwrap();
    backend.await.unwrap();
}
