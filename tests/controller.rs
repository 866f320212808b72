//! The volume populator controller against kube's `tower-test` API-server verifier: each
//! test feeds one reconcile a PVC and the controller's reflector stores (what its watches
//! show: populators, StorageClasses, CSINodes, PVC's, fill pods), and answers its API
//! requests from a script, asserting every request (method, path, query where it matters,
//! and the body) in order. A request the script does not expect, or one it expects that
//! never comes, fails the test.
//!
//! Also: golden files for PVC' and the fill pods (node and direct path), the CRD in
//! deploy/ equal to `fillfs crd`, and the source article's examples deserializing and
//! validating against the schema.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fillfs::controller::crd::OSSVolumePopulator;
use fillfs::controller::events::Events;
use fillfs::controller::metrics::Metrics;
use fillfs::controller::objects::{self, FillSpec, Settings};
use fillfs::controller::placement::FillPath;
use fillfs::controller::reconcile::{Context, ReconcileError, Stores, populator_ref, reconcile};
use fillfs::populate::ProgressLine;
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::jiff;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use serde_json::{Value, json};

type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const UID: &str = "6f1c2b7e-0000-4000-8000-000000000001";
const NS: &str = "argo";
/// As Argo names an ephemeral claim: `<pod>-<volume>`, longer than a label value may be.
const PVC: &str = "parallel-data-process-with-ossvp-x7k2p-echo-template-3180521436-scratch-volume";
const OURS: &str = "fillfs-system";
const RRSA_DIR: &str = "/var/run/secrets/ack.alibabacloud.com/rrsa-tokens";

fn settings() -> Settings {
    Settings {
        namespace: OURS.into(),
        image: "ghcr.io/fillfs/fillfs:test".into(),
        service_account: "fillfs-populate".into(),
        csi_driver: "csi.fillfs.io".into(),
        fill_deadline: Duration::from_secs(24 * 3600),
    }
}

/// The source article's OSSVolumePopulator, as committed in deploy/examples (placed on
/// ACS: its fills take the direct path).
fn seed_cr() -> OSSVolumePopulator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/seed-ossvolumepopulator.yaml"
    ))
    .unwrap();
    serde_yaml_ng::from_str(&text).expect("the seed example deserializes")
}

/// The seed populator without the ACS labels: its pods run on ordinary nodes, where the
/// node plugin may be.
fn plain_cr() -> OSSVolumePopulator {
    let mut cr = seed_cr();
    cr.spec.generic.as_mut().unwrap().labels.clear();
    cr
}

/// The populator as its watch shows it: already found valid, unless it says otherwise.
fn cr_json(cr: &OSSVolumePopulator) -> Value {
    let mut v = serde_json::to_value(cr).unwrap();
    v["metadata"]["resourceVersion"] = json!("5");
    if v.get("status").is_none_or(Value::is_null) {
        v["status"] = json!({"conditions": [{
            "type": "Valid", "status": "True", "reason": "Valid", "message": "",
            "lastTransitionTime": "2026-11-23T09:00:00Z"
        }]});
    }
    v
}

/// [`cr_json`] with `status.inFlight` at `n`.
fn cr_in_flight(cr: &OSSVolumePopulator, n: u32) -> Value {
    with(cr_json(cr), "/status/inFlight", json!(n))
}

/// A user PVC as the Argo example creates it.
fn user_pvc() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": PVC, "namespace": NS, "uid": UID, "resourceVersion": "100",
            "labels": {"diskType": "scratch-volume"}
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "alicloud-disk-essd",
            "resources": {"requests": {"storage": "20Gi"}},
            "dataSourceRef": {"apiGroup": "storage.alibabacloud.com", "kind": "OSSVolumePopulator", "name": "generic-demo"}
        },
        "status": {"phase": "Pending"}
    })
}

fn pvc_from(v: &Value) -> PersistentVolumeClaim {
    serde_json::from_value(v.clone()).unwrap()
}

fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let mut cur = &mut v;
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        if cur.get(part).is_none_or(Value::is_null) {
            cur[part] = json!({});
        }
        cur = cur.get_mut(part).unwrap();
    }
    cur[key] = value;
    v
}

fn storage_class(mode: &str) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "alicloud-disk-essd"},
        "provisioner": "diskplugin.csi.alibabacloud.com",
        "volumeBindingMode": mode
    })
}

/// A node's CSINode listing these drivers.
fn csinode(node: &str, drivers: &[&str]) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
        "metadata": {"name": node},
        "spec": {"drivers": drivers.iter().map(|d| json!({"name": d, "nodeID": node})).collect::<Vec<_>>()}
    })
}

fn prime(phase: &str, volume: Option<&str>) -> Value {
    let mut p = serde_json::to_value(objects::prime_pvc(
        &pvc_from(&user_pvc()),
        &seed_cr(),
        &settings(),
        None,
    ))
    .unwrap();
    p["metadata"]["uid"] = json!("prime-uid-1");
    p["metadata"]["resourceVersion"] = json!("7");
    if let Some(v) = volume {
        p["spec"]["volumeName"] = json!(v);
    }
    p["status"] = json!({"phase": phase});
    p
}

/// `now` moved by `secs` seconds, as the API writes timestamps.
fn ago(secs: i64) -> Value {
    json!(fillfs::controller::claim::rfc3339_secs(
        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs)
    ))
}

/// The fill pod of the seed populator (direct path), created 10 s ago.
fn pod(phase: &str, terminated: Option<(i32, &str)>) -> Value {
    let mut p = serde_json::to_value(objects::fill_pod(
        &pvc_from(&user_pvc()),
        &seed_cr(),
        &settings(),
        &FillSpec {
            path: FillPath::Direct,
            selected_node: None,
            secret: None,
        },
    ))
    .unwrap();
    p["metadata"]["creationTimestamp"] = ago(10);
    p["metadata"]["uid"] = json!("pod-uid-1");
    p["status"] = json!({"phase": phase});
    if let Some((code, msg)) = terminated {
        p["status"]["containerStatuses"] = json!([{
            "name": "populate", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": code, "message": msg}}
        }]);
    }
    p
}

/// A pending fill pod whose container waits for `reason`, created `age` seconds ago.
fn waiting_pod(reason: &str, message: &str, age: i64) -> Value {
    let mut p = pod("Pending", None);
    p["metadata"]["creationTimestamp"] = ago(age);
    p["status"]["containerStatuses"] = json!([{
        "name": "populate", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"waiting": {"reason": reason, "message": message}}
    }]);
    p
}

fn pv(claim_uid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "d-pv-1"},
        "spec": {
            "capacity": {"storage": "20Gi"},
            "claimRef": {"kind": "PersistentVolumeClaim", "namespace": OURS, "name": format!("prime-{UID}"), "uid": claim_uid}
        }
    })
}

/// A progress line as `fillfs populate --progress json` prints it.
fn progress_line(bytes_done: u64, percent: f64, elapsed_s: f64, done: bool) -> String {
    ProgressLine {
        bytes_done,
        bytes_total: 2 * 1048576,
        files_done: 3,
        files_total: 7,
        percent,
        rate_mib_s: 80.0,
        elapsed_s,
        done,
    }
    .to_line()
}

// ---- what the watches show ----

/// The controller's reflector stores, as values.
#[derive(Clone, Default)]
struct World {
    populators: Vec<Value>,
    classes: Vec<Value>,
    primes: Vec<Value>,
    pods: Vec<Value>,
    csinodes: Vec<Value>,
}

impl World {
    /// The seed populator and the claim's StorageClass (Immediate).
    fn seed() -> Self {
        World::default()
            .populator(cr_json(&seed_cr()))
            .class(storage_class("Immediate"))
    }
    fn populator(mut self, cr: Value) -> Self {
        self.populators = vec![cr];
        self
    }
    fn class(mut self, class: Value) -> Self {
        self.classes = vec![class];
        self
    }
    fn prime(mut self, p: Value) -> Self {
        self.primes.push(p);
        self
    }
    fn pod(mut self, p: Value) -> Self {
        self.pods.push(p);
        self
    }
    fn csinode(mut self, node: &str, drivers: &[&str]) -> Self {
        self.csinodes.push(csinode(node, drivers));
        self
    }
    fn stores(&self) -> Stores {
        Stores {
            claims: store_of(&self.primes),
            pods: store_of(&self.pods),
            classes: store_of(&self.classes),
            csinodes: store_of(&self.csinodes),
            populators: store_of(&self.populators),
        }
    }
}

fn store_of<K>(items: &[Value]) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, mut writer) = reflector::store::<K>();
    for v in items {
        let obj: K = serde_json::from_value(v.clone()).unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(obj));
    }
    reader
}

// ---- the scripted API server ----

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

enum Reply {
    Json(Value),
    NotFound,
    /// Answer with the request's own body (creates).
    Echo,
    Text(String),
    /// 409: the object changed since the resourceVersion the request carried.
    Conflict,
    /// 409 on a create: an object of that name exists.
    AlreadyExists,
    /// 422 with this message: the object breaks the API's validation.
    Invalid(&'static str),
    /// 403 with this message (quota, admission policy).
    Forbidden(String),
}

type Check = Box<dyn FnOnce(&Value) + Send>;

struct Expect {
    method: Method,
    path: String,
    /// Query parameters that must be there, with exactly these (decoded) values.
    params: Vec<(&'static str, String)>,
    reply: Reply,
    check: Option<Check>,
}

fn expect(method: Method, path: impl Into<String>, reply: Reply) -> Expect {
    Expect {
        method,
        path: path.into(),
        params: Vec::new(),
        reply,
        check: None,
    }
}

impl Expect {
    fn check(mut self, f: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }
    fn param(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.params.push((key, value.into()));
        self
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn query_param(uri: &http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

const CR_PATH: &str =
    "/apis/storage.alibabacloud.com/v1beta1/namespaces/argo/ossvolumepopulators/generic-demo";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/argo/events";

fn user_pvc_path() -> String {
    format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/{PVC}")
}
fn prime_path() -> String {
    format!("/api/v1/namespaces/{OURS}/persistentvolumeclaims/prime-{UID}")
}
fn pod_path() -> String {
    format!("/api/v1/namespaces/{OURS}/pods/populate-{UID}")
}
fn secret_path() -> String {
    format!("/api/v1/namespaces/{OURS}/secrets/populate-{UID}")
}
fn pods_path() -> String {
    format!("/api/v1/namespaces/{OURS}/pods")
}
fn primes_path() -> String {
    format!("/api/v1/namespaces/{OURS}/persistentvolumeclaims")
}

/// An event on the user's claim with this reason; `note` looks at its note.
fn event_where(reason: &'static str, note: impl FnOnce(&str) + Send + 'static) -> Expect {
    expect(Method::POST, EVENTS, Reply::Echo).check(move |b| {
        assert_eq!(b["reason"], reason, "event: {b}");
        assert_eq!(b["regarding"]["name"], PVC, "event: {b}");
        assert_eq!(b["regarding"]["uid"], UID, "event: {b}");
        assert_eq!(
            b["regarding"]["kind"], "PersistentVolumeClaim",
            "event: {b}"
        );
        note(b["note"].as_str().unwrap());
    })
}

fn event_with_reason(reason: &'static str) -> Expect {
    event_where(reason, |_| {})
}

/// The patch of the populator's `inFlight` (a count: no resourceVersion).
fn in_flight_patch(n: u32) -> Expect {
    expect(
        Method::PATCH,
        format!("{CR_PATH}/status"),
        Reply::Json(cr_in_flight(&seed_cr(), n)),
    )
    .check(move |b| assert_eq!(b, &json!({"status": {"inFlight": n}})))
}

/// The count of a finished fill, with the resourceVersion the populator was read at.
fn count_patch(counts: Value) -> Expect {
    expect(
        Method::PATCH,
        format!("{CR_PATH}/status"),
        Reply::Json(cr_json(&seed_cr())),
    )
    .check(move |b| {
        assert_eq!(
            b,
            &json!({"metadata": {"resourceVersion": "5"}, "status": counts})
        )
    })
}

/// A bound claim released: pod and PVC' deleted (the seed populator uses RRSA, so there is
/// no secret copy to delete), then the finishing patch.
fn released_steps(bound: &Value) -> Vec<Expect> {
    vec![
        expect(Method::DELETE, pod_path(), Reply::NotFound),
        expect(Method::DELETE, prime_path(), Reply::NotFound),
        finish_patch(bound),
    ]
}

/// The one patch that ends a fill: our finalizer out (tested in place), "done" in.
fn finish_patch(pvc: &Value) -> Expect {
    expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(|b| {
        assert_eq!(
            b,
            &json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "fillfs.io/populate"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
                {"op": "add", "path": "/metadata/annotations", "value": {}},
                {"op": "add", "path": "/metadata/annotations/fillfs.io~1progress", "value": "done"},
            ])
        );
    })
}

/// An API client on the scripted server, with the controller's event writer and metrics;
/// several reconciles may share one (as the controller's share its `Events`).
struct Session {
    handle: ApiHandle,
    client: kube::Client,
    events: Events,
    metrics: Arc<Metrics>,
}

impl Session {
    fn new() -> Self {
        let (svc, handle): (_, ApiHandle) = tower_test::mock::pair();
        let client = kube::Client::new(svc, "default");
        Session {
            events: Events::new(client.clone(), "fillfs-controller-test"),
            handle,
            client,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Runs one reconcile of `pvc` with `world` in the stores against the script.
    async fn reconcile(
        &mut self,
        pvc: Value,
        world: &World,
        script: Vec<Expect>,
    ) -> Result<Action, ReconcileError> {
        let ctx = Context {
            client: self.client.clone(),
            settings: settings(),
            events: self.events.clone(),
            metrics: self.metrics.clone(),
            stores: world.stores(),
            memo: Default::default(),
            max_attempts: 3,
            retry_base: Duration::from_secs(10),
            poll: Duration::from_secs(10),
        };
        // Like the API server, the mock moves the user PVC's resourceVersion on every
        // patch and refuses a patch that carries an older one.
        let mut pvc_version: u64 = pvc["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut rec = tokio::spawn(reconcile(Arc::new(pvc_from(&pvc)), Arc::new(ctx)));
        for (i, e) in script.into_iter().enumerate() {
            let next = tokio::select! {
                biased;
                next = self.handle.next_request() => next,
                r = &mut rec => panic!(
                    "request {i}: expected {} {}, but the reconcile ended ({:?})",
                    e.method, e.path, r.unwrap()
                ),
            };
            let (req, send) = next.expect("the client is alive");
            let (method, uri) = (req.method().clone(), req.uri().clone());
            assert_eq!(
                (&method, uri.path()),
                (&e.method, e.path.as_str()),
                "request {i}: got {method} {uri}"
            );
            for (k, v) in &e.params {
                assert_eq!(
                    query_param(&uri, k).as_deref(),
                    Some(v.as_str()),
                    "request {i}: {uri}: {k}"
                );
            }
            let content_type = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_string());
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if body.is_array() {
                assert_eq!(
                    content_type.as_deref(),
                    Some("application/json-patch+json"),
                    "request {i}"
                );
            }
            if method == Method::POST {
                assert_valid_labels(&body["metadata"], &format!("request {i}: {uri}"));
                if uri.path().starts_with("/apis/events.k8s.io/") {
                    assert_valid_event(&body, uri.path(), &format!("request {i}"));
                }
            }
            let mut reply = e.reply;
            if method == Method::PATCH && uri.path() == user_pvc_path() {
                let sent = match &body {
                    Value::Array(ops) => ops
                        .iter()
                        .find(|o| o["op"] == "test" && o["path"] == "/metadata/resourceVersion")
                        .map(|o| o["value"].clone()),
                    _ => body["metadata"].get("resourceVersion").cloned(),
                };
                if let Some(sent) = sent {
                    assert_eq!(
                        sent,
                        json!(pvc_version.to_string()),
                        "request {i}: stale resourceVersion (the API server answers 409 Conflict)"
                    );
                }
                pvc_version += 1;
                if let Reply::Json(v) = &mut reply {
                    v["metadata"]["resourceVersion"] = json!(pvc_version.to_string());
                }
            }
            if let Some(check) = e.check {
                check(&body);
            }
            let (code, out) = match reply {
                Reply::Json(v) => (200, serde_json::to_vec(&v).unwrap()),
                Reply::NotFound => (
                    404,
                    serde_json::to_vec(&status(404, "NotFound", "not found")).unwrap(),
                ),
                Reply::Echo => (201, bytes.to_vec()),
                Reply::Text(t) => (200, t.into_bytes()),
                Reply::Invalid(m) => (422, serde_json::to_vec(&status(422, "Invalid", m)).unwrap()),
                Reply::Conflict => (
                    409,
                    serde_json::to_vec(&status(409, "Conflict", "the object has been modified"))
                        .unwrap(),
                ),
                Reply::AlreadyExists => (
                    409,
                    serde_json::to_vec(&status(409, "AlreadyExists", "already exists")).unwrap(),
                ),
                Reply::Forbidden(m) => (
                    403,
                    serde_json::to_vec(&status(403, "Forbidden", &m)).unwrap(),
                ),
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(out))
                    .unwrap(),
            );
        }
        tokio::select! {
            biased;
            r = &mut rec => r.unwrap(),
            extra = self.handle.next_request() => match extra {
                Some((req, _)) => panic!("unexpected request after the script: {} {}", req.method(), req.uri()),
                None => panic!("the client went away"),
            },
        }
    }
}

/// Runs one reconcile of `pvc` against the script; returns its action and the metrics.
async fn run(pvc: Value, world: &World, script: Vec<Expect>) -> (Action, Arc<Metrics>) {
    let (result, metrics) = run_result(pvc, world, script).await;
    (result.expect("reconcile"), metrics)
}

/// [`run`], for a reconcile that may end in an error.
async fn run_result(
    pvc: Value,
    world: &World,
    script: Vec<Expect>,
) -> (Result<Action, ReconcileError>, Arc<Metrics>) {
    let mut session = Session::new();
    let result = session.reconcile(pvc, world, script).await;
    (result, session.metrics)
}

/// What the API server's validation says of an object's labels.
fn assert_valid_labels(meta: &Value, what: &str) {
    for (k, v) in meta["labels"].as_object().into_iter().flatten() {
        let v = v.as_str().unwrap();
        if let Some(problem) = fillfs::controller::crd::label_problem(k, v) {
            panic!("{what}: 422 Invalid: label {k}={v}: {problem}");
        }
    }
}

/// What the API server's validation says of an events.k8s.io/v1 Event (its 422s).
fn assert_valid_event(b: &Value, path: &str, what: &str) {
    let note = b["note"].as_str().unwrap_or_default();
    assert!(
        note.len() <= 1024,
        "{what}: 422 Invalid: note: Too long: may not be more than 1024 bytes (it has {})",
        note.len()
    );
    assert!(b["eventTime"].is_string(), "{what}: eventTime: Required");
    for field in [
        "reason",
        "action",
        "reportingController",
        "reportingInstance",
    ] {
        let v = b[field].as_str().unwrap_or_default();
        assert!(
            !v.is_empty() && v.len() <= 128,
            "{what}: 422 Invalid: {field}: {v:?}"
        );
    }
    assert_eq!(b["reportingController"], "fillfs.io/populator", "{what}");
    assert!(
        matches!(b["type"].as_str(), Some("Normal" | "Warning")),
        "{what}: type {}",
        b["type"]
    );
    let regarding = &b["regarding"];
    assert_eq!(
        b["metadata"]["generateName"],
        format!("{}.", regarding["name"].as_str().unwrap()),
        "{what}"
    );
    assert_eq!(
        path,
        format!(
            "/apis/events.k8s.io/v1/namespaces/{}/events",
            regarding["namespace"].as_str().unwrap()
        ),
        "{what}: an event lives in the namespace of what it regards"
    );
}

fn finalized(v: Value) -> Value {
    with(v, "/metadata/finalizers", json!([objects::FINALIZER]))
}

// ---- the fill pod, read from a request body ----

fn container(pod: &Value) -> &Value {
    &pod["spec"]["containers"][0]
}

/// The pod's volume of this name (null when there is none).
fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .unwrap_or(&Value::Null)
}

/// The container's mount of this volume (null when there is none).
fn mount<'a>(pod: &'a Value, name: &str) -> &'a Value {
    container(pod)["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .unwrap_or(&Value::Null)
}

/// The container's environment by name.
fn env_of(pod: &Value) -> serde_json::Map<String, Value> {
    container(pod)["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

fn has_csi_volume(pod: &Value) -> bool {
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v.get("csi").is_some())
}

/// Node path: the bucket through the fillfs CSI driver at /source, read-only; nothing of
/// the store's credentials in the pod's environment.
fn assert_node_pod(b: &Value, secret: Option<&str>) {
    assert_eq!(
        container(b)["args"],
        json!([
            "populate",
            "/source",
            "/target",
            "--dir-mode",
            "0777",
            "--file-mode",
            "0644",
            "--progress",
            "json"
        ])
    );
    let src = &volume(b, "source")["csi"];
    assert_eq!(src["driver"], "csi.fillfs.io", "{b}");
    assert_eq!(src["readOnly"], true);
    assert_eq!(src["volumeAttributes"]["bucket"], "my-test-bucket");
    assert_eq!(src["volumeAttributes"]["path"], "/many-files");
    assert_eq!(
        src["nodePublishSecretRef"]["name"],
        secret.map_or(Value::Null, |s| json!(s))
    );
    assert_eq!(
        mount(b, "source"),
        &json!({"name": "source", "mountPath": "/source", "readOnly": true})
    );
    assert!(volume(b, "rrsa-token").is_null());
    let env = env_of(b);
    assert!(
        env.keys().all(|k| !k.starts_with("ALIBABA_CLOUD_")),
        "{env:?}"
    );
    assert_eq!(b["metadata"]["annotations"]["fillfs.io/fill-path"], "node");
}

/// Direct path, arguments: `populate oss://BUCKET/PREFIX/ [options] /target ...`.
fn direct_args(extra: &[&str]) -> Value {
    let mut args = vec![
        "populate",
        "oss://my-test-bucket/many-files/",
        "--endpoint",
        "oss-cn-hangzhou-internal.aliyuncs.com",
        "--region",
        "cn-hangzhou",
    ];
    args.extend_from_slice(extra);
    args.extend([
        "/target",
        "--dir-mode",
        "0777",
        "--file-mode",
        "0644",
        "--progress",
        "json",
    ]);
    json!(args)
}

/// The positional arguments of `fillfs populate` (its options all take a value here,
/// except the flags listed).
fn positionals(args: &Value) -> Vec<String> {
    let flags = ["--no-sign-request", "--block", "--verify"];
    let mut out = Vec::new();
    let mut it = args.as_array().unwrap().iter().map(|a| a.as_str().unwrap());
    while let Some(a) = it.next() {
        if flags.contains(&a) {
            continue;
        }
        if a.starts_with("--") {
            it.next();
            continue;
        }
        out.push(a.to_string());
    }
    out
}

fn assert_direct_common(b: &Value) {
    assert!(!has_csi_volume(b), "no CSI volume on the direct path: {b}");
    assert!(mount(b, "source").is_null());
    assert_eq!(
        positionals(&container(b)["args"]),
        ["populate", "oss://my-test-bucket/many-files/", "/target"]
    );
    assert_eq!(
        b["metadata"]["annotations"]["fillfs.io/fill-path"],
        "direct"
    );
    // The one thing the pod needs from the API is its RRSA token, projected; never the
    // service account's own.
    assert_eq!(b["spec"]["automountServiceAccountToken"], false);
    assert_eq!(b["spec"]["serviceAccountName"], "fillfs-populate");
}

/// Direct path with RRSA: ALIBABA_CLOUD_* variables naming the role and a projected token
/// for STS.
fn assert_direct_rrsa_pod(b: &Value) {
    assert_direct_common(b);
    assert_eq!(container(b)["args"], direct_args(&[]));
    let env = env_of(b);
    assert_eq!(
        env["ALIBABA_CLOUD_ROLE_ARN"]["value"],
        "acs:ram::123456789012:role/oss-populator"
    );
    assert_eq!(
        env["ALIBABA_CLOUD_OIDC_PROVIDER_ARN"]["value"],
        "acs:ram::123456789012:oidc-provider/my-oidc-provider"
    );
    assert!(!env.contains_key("ALIBABA_CLOUD_ACCESS_KEY_ID"), "{env:?}");
    let token = &volume(b, "rrsa-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "sts.aliyuncs.com");
    assert!(token["expirationSeconds"].as_i64().unwrap() >= 600);
    let m = mount(b, "rrsa-token");
    assert_eq!(m["mountPath"], RRSA_DIR);
    assert_eq!(m["readOnly"], true);
    // The variable names the file kubelet writes.
    assert_eq!(
        env["ALIBABA_CLOUD_OIDC_TOKEN_FILE"]["value"],
        format!("{RRSA_DIR}/{}", token["path"].as_str().unwrap())
    );
}

/// Direct path with the copied access-key Secret: each variable from one of its keys.
fn assert_direct_secret_pod(b: &Value) {
    assert_direct_common(b);
    assert_eq!(container(b)["args"], direct_args(&[]));
    let env = env_of(b);
    let copy = format!("populate-{UID}");
    for (var, key, optional) in [
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", "akId", false),
        ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "akSecret", false),
        ("ALIBABA_CLOUD_SECURITY_TOKEN", "securityToken", true),
    ] {
        let e = &env[var];
        assert!(e.get("value").is_none(), "{var}: never a value in the spec");
        let r = &e["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], copy, "{var}");
        assert_eq!(r["key"], key, "{var}");
        assert_eq!(r["optional"].as_bool().unwrap_or(false), optional, "{var}");
    }
    assert!(!env.contains_key("ALIBABA_CLOUD_ROLE_ARN"), "{env:?}");
    assert!(volume(b, "rrsa-token").is_null());
}

/// The finalizer added to a new claim, with the resourceVersion it was read at.
fn finalizer_patch(pvc: &Value) -> Expect {
    let version = pvc["metadata"]["resourceVersion"].clone();
    expect(
        Method::PATCH,
        user_pvc_path(),
        Reply::Json(finalized(pvc.clone())),
    )
    .check(move |b| {
        assert_eq!(b["metadata"]["finalizers"], json!(["fillfs.io/populate"]));
        assert_eq!(
            b["metadata"]["resourceVersion"], version,
            "optimistic concurrency"
        );
    })
}

fn prime_post(selected_node: Option<&'static str>) -> Expect {
    expect(Method::POST, primes_path(), Reply::Echo).check(move |b| {
        assert_eq!(b["metadata"]["name"], format!("prime-{UID}"));
        assert_eq!(b["metadata"]["labels"]["fillfs.io/pvc-uid"], UID);
        assert_eq!(b["metadata"]["annotations"]["fillfs.io/pvc-name"], PVC);
        assert_eq!(b["spec"]["storageClassName"], "alicloud-disk-essd");
        assert_eq!(b["spec"]["resources"]["requests"]["storage"], "20Gi");
        assert_eq!(b["spec"]["accessModes"], json!(["ReadWriteOnce"]));
        assert_eq!(
            b["metadata"]["annotations"]["volume.kubernetes.io/selected-node"],
            selected_node.map_or(Value::Null, |n| json!(n))
        );
    })
}

/// The fill pod created: what every fill pod has, then `check` for its path.
fn pod_post(
    selected_node: Option<&'static str>,
    path: FillPath,
    check: impl FnOnce(&Value) + Send + 'static,
) -> Expect {
    expect(Method::POST, pods_path(), Reply::Echo).check(move |b| {
        assert_eq!(b["metadata"]["name"], format!("populate-{UID}"));
        assert_eq!(
            b["metadata"]["annotations"],
            json!({
                "fillfs.io/pvc-namespace": NS,
                "fillfs.io/pvc-name": PVC,
                "fillfs.io/populator": "argo/generic-demo",
                "fillfs.io/fill-path": path.as_str(),
            }),
            "the pod watch maps pods back to claims through these"
        );
        assert_eq!(
            b["spec"]["nodeName"],
            selected_node.map_or(Value::Null, |n| json!(n))
        );
        assert_eq!(b["spec"]["restartPolicy"], "Never");
        assert_eq!(b["spec"]["activeDeadlineSeconds"], 24 * 3600);
        assert_eq!(
            volume(b, "target")["persistentVolumeClaim"]["claimName"],
            format!("prime-{UID}")
        );
        // PVC' mounted at /target, or (Block) its device at /dev/target.
        let device = &container(b)["volumeDevices"][0];
        if device.is_null() {
            assert_eq!(mount(b, "target")["mountPath"], "/target");
        } else {
            assert_eq!(
                device,
                &json!({"name": "target", "devicePath": "/dev/target"})
            );
        }
        let sc = &container(b)["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        match path {
            FillPath::Node => assert!(has_csi_volume(b), "{b}"),
            FillPath::Direct => assert!(!has_csi_volume(b), "{b}"),
        }
        check(b);
    })
}

/// FillStarted, naming the path and (in `why`) the reason for it.
fn fill_started(path: FillPath, why: &'static str) -> Expect {
    event_where("FillStarted", move |note| {
        assert!(
            note.starts_with("attempt ")
                && note.contains(" of 3: filling from oss://my-test-bucket/"),
            "{note}"
        );
        assert!(
            note.contains(&format!(
                "with pod {OURS}/populate-{UID} on the {} path",
                path.as_str()
            )),
            "{note}"
        );
        assert!(note.contains(why), "{note}");
    })
}

/// Requests of a first reconcile that starts a fill (no finalizer, PVC' or pod yet):
/// finalizer, PVC', the pod (`check` looks at it), FillStarted, inFlight up by one.
fn start_fill(
    pvc: &Value,
    selected_node: Option<&'static str>,
    path: FillPath,
    why: &'static str,
    check: impl FnOnce(&Value) + Send + 'static,
) -> Vec<Expect> {
    vec![
        finalizer_patch(pvc),
        prime_post(selected_node),
        pod_post(selected_node, path, check),
        fill_started(path, why),
        in_flight_patch(1),
    ]
}

/// [`start_fill`] for the seed populator: the direct path (it runs on ACS).
fn start_seed_fill(pvc: &Value, selected_node: Option<&'static str>) -> Vec<Expect> {
    start_fill(
        pvc,
        selected_node,
        FillPath::Direct,
        "alibabacloud.com/acs",
        |b| {
            assert_direct_rrsa_pod(b);
            assert_eq!(
                b["metadata"]["labels"]["alibabacloud.com/acs"], "true",
                "generic.labels"
            );
        },
    )
}

// ---- the state machine ----

#[tokio::test]
async fn happy_path_filesystem_from_start_to_rebind() {
    // 1. A new PVC: finalizer, PVC', pod, FillStarted, inFlight 1.
    let (action, _) = run(
        user_pvc(),
        &World::seed(),
        start_seed_fill(&user_pvc(), None),
    )
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));

    // 2. Running: progress from the pod's JSON lines onto the PVC.
    let running = World::seed()
        .populator(cr_in_flight(&seed_cr(), 1))
        .prime(prime("Bound", Some("d-pv-1")))
        .pod(pod("Running", None));
    let log = format!(
        "INFO fillfs: listing\n{}\n",
        progress_line(880_000, 41.96, 3.0, false)
    );
    let script = vec![
        expect(Method::GET, format!("{}/log", pod_path()), Reply::Text(log))
            .param("container", "populate")
            .param("tailLines", "5"),
        expect(
            Method::PATCH,
            user_pvc_path(),
            Reply::Json(finalized(user_pvc())),
        )
        .check(|b| {
            assert_eq!(
                b,
                &json!({"metadata": {"annotations": {"fillfs.io/progress": "42.0%"}}})
            )
        }),
    ];
    let (action, metrics) = run(finalized(user_pvc()), &running, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let text = metrics.render();
    assert!(
        text.contains("fillfs_populations_in_flight 1"),
        "from the pod store: {text}"
    );

    // 3. Succeeded: the PV is handed to the user's claim.
    let succeeded = World::seed()
        .populator(cr_in_flight(&seed_cr(), 1))
        .prime(prime("Bound", Some("d-pv-1")))
        .pod(pod("Succeeded", Some((0, ""))));
    let script = vec![
        expect(
            Method::GET,
            "/api/v1/persistentvolumes/d-pv-1",
            Reply::Json(pv("prime-uid-1")),
        ),
        expect(
            Method::PATCH,
            "/api/v1/persistentvolumes/d-pv-1",
            Reply::Json(pv(UID)),
        )
        .check(|b| {
            let c = &b["spec"]["claimRef"];
            assert_eq!(
                (c["namespace"].as_str(), c["name"].as_str()),
                (Some(NS), Some(PVC))
            );
            assert_eq!(
                (c["uid"].as_str(), c["resourceVersion"].as_str()),
                (Some(UID), Some("100"))
            );
            assert_eq!(
                b["metadata"]["annotations"]["fillfs.io/populated-from"],
                "argo/generic-demo"
            );
        }),
    ];
    let (action, metrics) = run(finalized(user_pvc()), &succeeded, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    assert!(metrics.render().contains("fillfs_populations_in_flight 0"));

    // Handed over already (the PV names the claim): nothing written again.
    let script = vec![expect(
        Method::GET,
        "/api/v1/persistentvolumes/d-pv-1",
        Reply::Json(pv(UID)),
    )];
    let (action, _) = run(finalized(user_pvc()), &succeeded, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));

    // 4. The PV controller bound the user's PVC: clean up, then "done" and the finalizer
    // in one JSON patch (no resourceVersion to go stale), count it.
    let bound = with(finalized(user_pvc()), "/spec/volumeName", json!("d-pv-1"));
    let summary = format!("{}\n", progress_line(1048576, 100.0, 12.5, true));
    let script = vec![
        expect(
            Method::GET,
            format!("{}/log", pod_path()),
            Reply::Text(summary),
        )
        .param("container", "populate"),
        expect(
            Method::DELETE,
            pod_path(),
            Reply::Json(pod("Succeeded", None)),
        ),
        expect(
            Method::DELETE,
            prime_path(),
            Reply::Json(prime("Lost", None)),
        ),
        finish_patch(&bound),
        event_where("Populated", |note| {
            assert_eq!(
                note,
                "filled from oss://my-test-bucket/many-files/ (1.0 MiB)"
            )
        }),
        count_patch(json!({"succeeded": 1, "inFlight": 0})),
    ];
    let (action, metrics) = run(bound, &succeeded, script).await;
    assert_eq!(action, Action::await_change());
    let text = metrics.render();
    assert!(
        text.contains("fillfs_populations_total{result=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("fillfs_populated_bytes_total 1048576"),
        "{text}"
    );
    assert!(
        text.contains("fillfs_population_duration_seconds_sum 12.5"),
        "{text}"
    );
}

#[tokio::test]
async fn block_mode_writes_one_image_raw() {
    let pvc = with(user_pvc(), "/spec/volumeMode", json!("Block"));
    let block_checks = |b: &Value| {
        let c = container(b);
        assert_eq!(
            c["volumeDevices"],
            json!([{"name": "target", "devicePath": "/dev/target"}])
        );
        assert!(mount(b, "target").is_null(), "a device, not a mount");
        assert_eq!(c["securityContext"]["privileged"], false);
        assert_eq!(
            c["securityContext"]["capabilities"],
            json!({"drop": ["ALL"]})
        );
        assert_eq!(b["spec"]["securityContext"]["runAsUser"], 0);
    };
    // Direct (the seed's placement): the image object itself.
    let mut cr = seed_cr();
    cr.spec.path = "/images/disk.img".into();
    let world = World::seed().populator(cr_json(&cr));
    let mut script = vec![
        finalizer_patch(&pvc),
        expect(Method::POST, primes_path(), Reply::Echo)
            .check(|b| assert_eq!(b["spec"]["volumeMode"], "Block")),
        pod_post(None, FillPath::Direct, move |b| {
            block_checks(b);
            assert_eq!(
                container(b)["args"],
                json!([
                    "populate",
                    "oss://my-test-bucket/images/disk.img",
                    "--endpoint",
                    "oss-cn-hangzhou-internal.aliyuncs.com",
                    "--region",
                    "cn-hangzhou",
                    "/dev/target",
                    "--block",
                    "--progress",
                    "json"
                ])
            );
        }),
        fill_started(FillPath::Direct, "virtual nodes"),
    ];
    script.push(in_flight_patch(1));
    let (action, _) = run(pvc.clone(), &world, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));

    // Node path: the image's directory is mounted, the image file is the source.
    let mut cr = plain_cr();
    cr.spec.path = "/images/disk.img".into();
    let world = World::seed()
        .populator(cr_json(&cr))
        .csinode("node-1", &["csi.fillfs.io"]);
    let script = vec![
        finalizer_patch(&pvc),
        expect(Method::POST, primes_path(), Reply::Echo)
            .check(|b| assert_eq!(b["spec"]["volumeMode"], "Block")),
        pod_post(None, FillPath::Node, move |b| {
            block_checks(b);
            assert_eq!(
                container(b)["args"],
                json!([
                    "populate",
                    "/source/disk.img",
                    "/dev/target",
                    "--block",
                    "--progress",
                    "json"
                ])
            );
            assert_eq!(
                volume(b, "source")["csi"]["volumeAttributes"]["path"],
                "/images"
            );
        }),
        fill_started(FillPath::Node, "registered"),
        in_flight_patch(1),
    ];
    let (action, _) = run(pvc, &world, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn wait_for_first_consumer_then_fill_on_its_node() {
    let world = World::seed().class(storage_class("WaitForFirstConsumer"));
    let (action, _) = run(user_pvc(), &world, vec![]).await;
    assert_eq!(
        action,
        Action::await_change(),
        "no PVC' or pod before a node is chosen"
    );

    let selected = with(
        user_pvc(),
        "/metadata/annotations",
        json!({"volume.kubernetes.io/selected-node": "node-7"}),
    );
    let script = start_seed_fill(&selected, Some("node-7"));
    let (action, _) = run(selected, &world, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

/// A fill of the seed populator whose pod `p` is in the store (PVC' bound, the populator
/// counting it in flight).
fn with_pod(p: Value) -> World {
    World::seed()
        .populator(cr_in_flight(&seed_cr(), 1))
        .prime(prime("Bound", Some("d-pv-1")))
        .pod(p)
}

/// `pvc` with these annotations added.
fn annotated(pvc: Value, pairs: Value) -> Value {
    let mut pvc = pvc;
    if pvc["metadata"]
        .get("annotations")
        .is_none_or(Value::is_null)
    {
        pvc["metadata"]["annotations"] = json!({});
    }
    for (k, v) in pairs.as_object().unwrap() {
        pvc["metadata"]["annotations"][k] = v.clone();
    }
    pvc
}

#[tokio::test]
async fn a_failed_fill_is_retried_with_backoff() {
    for (attempts_before, delay) in [(None, 10u64), (Some("1"), 20)] {
        let mut pvc = finalized(user_pvc());
        if let Some(a) = attempts_before {
            pvc = annotated(pvc, json!({"fillfs.io/attempts": a}));
        }
        let next = attempts_before.map_or(1, |a| a.parse::<u32>().unwrap() + 1);
        let decided = Arc::new(Mutex::new(Value::Null));
        let seen = decided.clone();
        let world = with_pod(pod(
            "Failed",
            Some((
                1,
                "fillfs: error: cannot reach https://oss: connection reset",
            )),
        ));
        let script = vec![
            // The decision is on the PVC before the pod goes (its deletion wakes us).
            expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(move |b| {
                let a = &b["metadata"]["annotations"];
                assert_eq!(a["fillfs.io/attempts"], next.to_string());
                assert_eq!(a["fillfs.io/failed-pod"], "pod-uid-1");
                assert!(a.get("fillfs.io/failed").is_none(), "{a}");
                *seen.lock().unwrap() = a.clone();
            }),
            expect(Method::DELETE, pod_path(), Reply::Json(pod("Failed", None))),
            event_where("FillFailed", move |note| {
                assert!(
                    note.contains(&format!("attempt {next} of 3"))
                        && note.contains("connection reset")
                        && note.contains(&format!("retrying in {delay}s")),
                    "{note}"
                );
            }),
            // The failed pod no longer counts.
            in_flight_patch(0),
        ];
        let (action, metrics) = run(pvc.clone(), &world, script).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(delay)));
        assert!(
            metrics
                .render()
                .contains("fillfs_population_retries_total 1")
        );

        // At once, woken by the patch and the deletion: the pod is gone, the backoff is
        // not over, so nothing is created; the wait is what is left of it.
        let annotations = decided.lock().unwrap().clone();
        let after = annotated(pvc, annotations.clone());
        let retry_after = annotations["fillfs.io/retry-after"].as_str().unwrap();
        let at: jiff::Timestamp = retry_after.parse().unwrap();
        let ahead = (at.as_second() - jiff::Timestamp::now().as_second()) as u64;
        assert!((delay - 2..=delay).contains(&ahead), "{retry_after}");
        let gone = World::seed().prime(prime("Bound", Some("d-pv-1")));
        let (action, _) = run(after.clone(), &gone, vec![]).await;
        assert!(
            (delay - 2..=delay).any(|s| action == Action::requeue(Duration::from_secs(s))),
            "{action:?}: the rest of the {delay}s backoff"
        );

        // Once it is over, the next pod starts (PVC' and the finalizer are there already).
        let mut over = after;
        over["metadata"]["annotations"]["fillfs.io/retry-after"] = json!("2026-01-01T00:00:00Z");
        let script = vec![
            pod_post(None, FillPath::Direct, assert_direct_rrsa_pod),
            event_where("FillStarted", move |note| {
                assert!(
                    note.starts_with(&format!("attempt {} of 3: ", next + 1)),
                    "{note}"
                )
            }),
            in_flight_patch(1),
        ];
        let (action, _) = run(over, &gone, script).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    }
}

#[tokio::test]
async fn permanent_failures_stop_without_a_hot_loop() {
    // Exit 2 (e.g. checksum mismatch) at the first attempt; then a third transient failure.
    let cases = [
        (
            None,
            2,
            "fillfs: error: data/a.bin: checksum mismatch (expected 1, got 2) after a retry",
            "cannot succeed",
        ),
        (
            Some("2"),
            1,
            "fillfs: error: cannot reach oss",
            "failed 3 times",
        ),
    ];
    for (before, code, msg, why) in cases {
        let mut pvc = finalized(user_pvc());
        if let Some(a) = before {
            pvc = annotated(pvc, json!({"fillfs.io/attempts": a}));
        }
        let attempts = before.map_or(1, |a| a.parse::<u32>().unwrap() + 1);
        let world = with_pod(pod("Failed", Some((code, msg))));
        let script = vec![
            expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(move |b| {
                assert_eq!(
                    b["metadata"]["annotations"],
                    json!({
                        "fillfs.io/progress": format!("failed: {msg}"),
                        "fillfs.io/failed": msg,
                        "fillfs.io/attempts": attempts.to_string(),
                        "fillfs.io/failed-pod": "pod-uid-1",
                    })
                );
            }),
            expect(Method::DELETE, pod_path(), Reply::Json(pod("Failed", None))),
            event_where("FillFailed", move |note| {
                assert!(note.contains(why) && note.contains("giving up"), "{note}");
                assert!(note.contains(msg), "{note}");
            }),
            count_patch(json!({"failed": 1, "inFlight": 0})),
        ];
        let (action, metrics) = run(pvc.clone(), &world, script).await;
        assert_eq!(
            action,
            Action::await_change(),
            "a permanent failure is not retried"
        );
        assert!(
            metrics
                .render()
                .contains("fillfs_populations_total{result=\"failed\"} 1")
        );

        // Woken at once by the patch and the deletion: the pod is gone and nothing starts.
        let after = annotated(
            pvc,
            json!({"fillfs.io/failed": msg, "fillfs.io/failed-pod": "pod-uid-1"}),
        );
        let gone = World::seed().prime(prime("Bound", Some("d-pv-1")));
        let (action, _) = run(after.clone(), &gone, vec![]).await;
        assert_eq!(action, Action::await_change());

        // The pod's deletion did not go through: it is deleted again, not counted again.
        let script = vec![expect(
            Method::DELETE,
            pod_path(),
            Reply::Json(pod("Failed", None)),
        )];
        let (action, metrics) = run(after, &world, script).await;
        assert_eq!(action, Action::await_change());
        assert!(!metrics.render().contains("result=\"failed\"} 1"));
    }
}

/// A claim being deleted, with our finalizer behind kubernetes' own.
fn deleted_claim() -> Value {
    with(
        with(
            user_pvc(),
            "/metadata/finalizers",
            json!(["kubernetes.io/pvc-protection", objects::FINALIZER]),
        ),
        "/metadata/deletionTimestamp",
        json!("2026-11-23T10:05:00Z"),
    )
}

fn deleted_steps(pvc: &Value) -> Vec<Expect> {
    vec![
        expect(
            Method::DELETE,
            pod_path(),
            Reply::Json(pod("Running", None)),
        ),
        expect(
            Method::DELETE,
            prime_path(),
            Reply::Json(prime("Bound", None)),
        ),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(|b| {
            assert_eq!(
                b,
                &json!([
                    {"op": "test", "path": "/metadata/finalizers/1", "value": "fillfs.io/populate"},
                    {"op": "remove", "path": "/metadata/finalizers/1"},
                ])
            )
        }),
    ]
}

#[tokio::test]
async fn deleting_the_pvc_mid_fill_cleans_up_at_once() {
    let pvc = deleted_claim();
    let mut script = deleted_steps(&pvc);
    script.push(in_flight_patch(0));
    let (action, _) = run(pvc, &with_pod(pod("Running", None)), script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_claim_deleted_mid_fill_leaves_in_flight_counting_only_the_others() {
    // Our pod, another claim's of the same populator (still running), one of another
    // populator, and one of ours that finished: inFlight 2 goes down to 1.
    let pvc = deleted_claim();
    let other = with(
        with(
            pod("Running", None),
            "/metadata/name",
            json!("populate-other"),
        ),
        "/metadata/uid",
        json!("pod-uid-2"),
    );
    let mut elsewhere = with(other.clone(), "/metadata/name", json!("populate-elsewhere"));
    elsewhere["metadata"]["annotations"]["fillfs.io/populator"] = json!("data/generic-demo");
    let finished = with(
        pod("Succeeded", Some((0, ""))),
        "/metadata/name",
        json!("populate-finished"),
    );
    let world = World::seed()
        .populator(cr_in_flight(&seed_cr(), 2))
        .prime(prime("Bound", Some("d-pv-1")))
        .pod(pod("Running", None))
        .pod(other.clone())
        .pod(elsewhere)
        .pod(finished);
    let mut script = deleted_steps(&pvc);
    script.push(in_flight_patch(1));
    let (action, metrics) = run(pvc.clone(), &world, script).await;
    assert_eq!(action, Action::await_change());
    assert!(
        metrics.render().contains("fillfs_populations_in_flight 3"),
        "all populators' running pods, as the store showed them"
    );

    // The populator shows the right count already: nothing to write.
    let world = World::seed()
        .populator(cr_in_flight(&seed_cr(), 1))
        .pod(pod("Running", None))
        .pod(other);
    let (action, _) = run(pvc.clone(), &world, deleted_steps(&pvc)).await;
    assert_eq!(action, Action::await_change());

    // Its populator deleted meanwhile: cleaned up (a secret copy too: whether the populator
    // used one is unknown now), no status to write.
    let world = World::default().pod(pod("Running", None));
    let mut script = deleted_steps(&pvc);
    script.insert(2, expect(Method::DELETE, secret_path(), Reply::NotFound));
    let (action, _) = run(pvc.clone(), &world, script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_missing_populator_is_waited_for_then_used() {
    let nothing = World::seed();
    let nothing = World {
        populators: vec![],
        ..nothing
    };
    let script = vec![event_where("PopulatorNotFound", |note| {
        assert!(note.contains("argo/generic-demo"), "{note}")
    })];
    let (action, _) = run(user_pvc(), &nothing, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    // Created later: the next reconcile starts the fill.
    run(
        user_pvc(),
        &World::seed(),
        start_seed_fill(&user_pvc(), None),
    )
    .await;
}

#[tokio::test]
async fn an_invalid_spec_never_creates_a_pod() {
    let mut cr = seed_cr();
    cr.spec.bucket = "My_Bucket".into();
    let world = World::seed().populator(cr_json(&cr));
    let script = vec![
        event_where("InvalidSpec", |note| {
            assert!(note.contains("My_Bucket"), "{note}")
        }),
        expect(
            Method::PATCH,
            format!("{CR_PATH}/status"),
            Reply::Json(cr_json(&cr)),
        )
        .check(|b| {
            let c = &b["status"]["conditions"][0];
            assert_eq!(
                (c["type"].as_str(), c["status"].as_str()),
                (Some("Valid"), Some("False"))
            );
            assert!(c["message"].as_str().unwrap().contains("My_Bucket"));
        }),
    ];
    let (action, _) = run(user_pvc(), &world, script).await;
    assert_eq!(action, Action::await_change());

    // Fixed: Valid goes back to True (then the claim waits for its consumer here).
    let mut fixed = cr_json(&seed_cr());
    fixed["status"]["conditions"][0]["status"] = json!("False");
    fixed["status"]["conditions"][0]["message"] = json!("spec.bucket \"My_Bucket\" ...");
    let world = World::seed()
        .populator(fixed.clone())
        .class(storage_class("WaitForFirstConsumer"));
    let script = vec![
        expect(
            Method::PATCH,
            format!("{CR_PATH}/status"),
            Reply::Json(fixed),
        )
        .check(|b| {
            let c = &b["status"]["conditions"][0];
            assert_eq!(
                (
                    c["type"].as_str(),
                    c["status"].as_str(),
                    c["message"].as_str()
                ),
                (Some("Valid"), Some("True"), Some(""))
            );
        }),
    ];
    let (action, _) = run(user_pvc(), &world, script).await;
    assert_eq!(action, Action::await_change());

    // A PVC without a size is refused on that PVC only: the shared populator stays Valid.
    let no_size = with(user_pvc(), "/spec/resources", json!({}));
    let script = vec![
        event_where("InvalidClaim", |note| {
            assert!(note.contains("requests no storage size"), "{note}")
        }),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(user_pvc())).check(|b| {
            let why = b["metadata"]["annotations"]["fillfs.io/invalid"]
                .as_str()
                .unwrap();
            assert!(why.contains("requests no storage size"), "{why}");
        }),
    ];
    let (action, _) = run(no_size, &World::seed(), script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn block_mode_from_a_prefix_is_refused_before_anything_is_created() {
    // The seed's path is the prefix /many-files/.
    let pvc = with(user_pvc(), "/spec/volumeMode", json!("Block"));
    let reason = Arc::new(Mutex::new(String::new()));
    let seen = reason.clone();
    let script = vec![
        event_where("InvalidClaim", |note| {
            assert!(
                note.contains("volumeMode Block") && note.contains("\"/many-files/\""),
                "{note}"
            );
        }),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(move |b| {
            *seen.lock().unwrap() = b["metadata"]["annotations"]["fillfs.io/invalid"]
                .as_str()
                .unwrap()
                .to_string();
        }),
    ];
    let (action, _) = run(pvc.clone(), &World::seed(), script).await;
    assert_eq!(action, Action::await_change(), "permanent: not retried");
    // Said once: the reconcile the annotation wakes makes no request at all.
    let reason = reason.lock().unwrap().clone();
    assert!(reason.contains("/images/disk.img"), "{reason}");
    let said = annotated(pvc, json!({"fillfs.io/invalid": reason}));
    let (action, _) = run(said, &World::seed(), vec![]).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn an_access_key_secret_is_copied_next_to_the_pod() {
    let secret_ref = Some(fillfs::controller::crd::SecretRef {
        name: "oss-creds".into(),
    });
    // On ordinary nodes with the node plugin: the copy is the CSI volume's secret.
    let mut cr = plain_cr();
    cr.spec.generic.as_mut().unwrap().rrsa_configs = None;
    cr.spec.credentials_secret_ref = secret_ref.clone();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "oss-creds", "namespace": NS},
        "data": {"akId": "TFRBSWlk", "akSecret": "c2VjcmV0", "unrelated": "eA=="}
    });
    let secret_get = format!("/api/v1/namespaces/{NS}/secrets/oss-creds");
    let copy_post = || {
        expect(
            Method::POST,
            format!("/api/v1/namespaces/{OURS}/secrets"),
            Reply::Echo,
        )
        .check(|b| {
            assert_eq!(b["metadata"]["name"], format!("populate-{UID}"));
            assert_eq!(b["metadata"]["labels"]["fillfs.io/pvc-uid"], UID);
            assert_eq!(
                b["data"],
                json!({"akId": "TFRBSWlk", "akSecret": "c2VjcmV0"}),
                "only the key entries"
            );
        })
    };
    let node_world = World::seed()
        .populator(cr_json(&cr))
        .csinode("node-1", &["csi.fillfs.io"])
        .prime(prime("Bound", Some("d-pv-1")));
    let script = vec![
        expect(Method::GET, secret_get.clone(), Reply::Json(secret.clone())),
        copy_post(),
        pod_post(None, FillPath::Node, |b| {
            assert_node_pod(b, Some(&format!("populate-{UID}")));
            let attrs = &volume(b, "source")["csi"]["volumeAttributes"];
            assert!(attrs.get("roleArn").is_none(), "{attrs}");
        }),
        fill_started(FillPath::Node, "registered"),
        in_flight_patch(1),
    ];
    run(finalized(user_pvc()), &node_world, script).await;

    // On ACS (the seed's labels): the direct path, the copy's keys as the variables.
    let mut direct = seed_cr();
    direct.spec.generic.as_mut().unwrap().rrsa_configs = None;
    direct.spec.credentials_secret_ref = secret_ref;
    let direct_world = World::seed()
        .populator(cr_json(&direct))
        .csinode("node-1", &["csi.fillfs.io"])
        .prime(prime("Bound", Some("d-pv-1")));
    let script = vec![
        expect(Method::GET, secret_get.clone(), Reply::Json(secret)),
        copy_post(),
        pod_post(None, FillPath::Direct, assert_direct_secret_pod),
        fill_started(FillPath::Direct, "virtual nodes"),
        in_flight_patch(1),
    ];
    run(finalized(user_pvc()), &direct_world, script).await;

    // A new claim and a missing Secret: an event, and nothing written (no finalizer, no
    // PVC'); Secrets are not watched, so it looks again in 30 s.
    let new_claim = World {
        primes: vec![],
        ..node_world
    };
    let script = vec![
        expect(Method::GET, secret_get.clone(), Reply::NotFound),
        event_where("SecretNotFound", |note| {
            assert!(note.contains("argo/oss-creds"), "{note}")
        }),
    ];
    let (action, _) = run(user_pvc(), &new_claim, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));

    // A Secret without akSecret: the same, naming the key and never a value.
    let partial = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "oss-creds", "namespace": NS},
        "data": {"akId": "TFRBSWlk"}
    });
    let script = vec![
        expect(Method::GET, secret_get, Reply::Json(partial)),
        event_where("SecretInvalid", |note| {
            assert!(note.contains("no akSecret"), "{note}");
            assert!(
                !note.contains("TFRBSWlk") && !note.contains("LTAIid"),
                "{note}"
            );
        }),
    ];
    let (action, _) = run(user_pvc(), &new_claim, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_bound_claim_is_only_cleaned_up_never_filled_again() {
    // The finish patch failed once (e.g. a conflict) after the clean-up: the retry finds
    // the claim bound, PVC' and the pod gone. It must not start a new fill.
    let bound = with(finalized(user_pvc()), "/spec/volumeName", json!("d-pv-1"));
    let mut script = released_steps(&bound);
    script.extend([
        event_where("Populated", |note| {
            assert_eq!(note, "filled from oss://my-test-bucket/many-files/")
        }),
        count_patch(json!({"succeeded": 1, "inFlight": 0})),
    ]);
    let (action, _) = run(bound.clone(), &World::seed(), script).await;
    assert_eq!(action, Action::await_change());

    // Its populator deleted meanwhile: still cleaned up (a secret copy too: whether the
    // populator used one is unknown now) and released.
    let mut script = released_steps(&bound);
    script.insert(2, expect(Method::DELETE, secret_path(), Reply::NotFound));
    script.push(event_where("Populated", |note| assert_eq!(note, "filled")));
    let (action, _) = run(bound, &World::default(), script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn status_counts_survive_fills_that_end_at_once() {
    // Another claim's fill was counted since the populator was read: the count is re-read.
    let bound = with(finalized(user_pvc()), "/spec/volumeName", json!("d-pv-1"));
    let mut newer = cr_json(&seed_cr());
    newer["metadata"]["resourceVersion"] = json!("6");
    newer["status"]["succeeded"] = json!(4);
    let running = with(
        pod("Running", None),
        "/metadata/name",
        json!("populate-other"),
    );
    let mut elsewhere = with(
        running.clone(),
        "/metadata/name",
        json!("populate-elsewhere"),
    );
    elsewhere["metadata"]["annotations"]["fillfs.io/populator"] = json!("data/generic-demo");
    let failed = with(
        pod("Failed", None),
        "/metadata/name",
        json!("populate-failed"),
    );
    let going = with(
        with(running.clone(), "/metadata/name", json!("populate-going")),
        "/metadata/deletionTimestamp",
        ago(1),
    );
    let world = World::seed()
        .pod(running)
        .pod(elsewhere)
        .pod(failed)
        .pod(going);
    let mut script = released_steps(&bound);
    script.extend([
        event_with_reason("Populated"),
        expect(Method::PATCH, format!("{CR_PATH}/status"), Reply::Conflict).check(|b| {
            assert_eq!(
                b,
                &json!({"metadata": {"resourceVersion": "5"}, "status": {"succeeded": 1, "inFlight": 1}})
            )
        }),
        expect(Method::GET, CR_PATH, Reply::Json(newer.clone())),
        expect(Method::PATCH, format!("{CR_PATH}/status"), Reply::Json(newer)).check(|b| {
            assert_eq!(
                b,
                &json!({"metadata": {"resourceVersion": "6"}, "status": {"succeeded": 5, "inFlight": 1}})
            )
        }),
    ]);
    let (action, _) = run(bound, &world, script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_claim_problem_that_is_fixed_is_cleared_then_filled() {
    let pvc = annotated(
        user_pvc(),
        json!({"fillfs.io/invalid": "volumeMode Block takes one disk image ..."}),
    );
    let script = vec![
        expect(Method::PATCH, user_pvc_path(), Reply::Json(user_pvc())).check(|b| {
            assert_eq!(
                b,
                &json!({"metadata": {"annotations": {"fillfs.io/invalid": null}}})
            )
        }),
    ];
    // Nothing more in this round: its copy of the claim is stale after the patch (the mock
    // would refuse the finalizer's resourceVersion); the patch wakes the next round.
    let (action, _) = run(pvc, &World::seed(), script).await;
    assert_eq!(action, Action::await_change());
    // The next round, with the claim as it is now, starts the fill.
    let now = with(user_pvc(), "/metadata/resourceVersion", json!("101"));
    let (action, _) = run(now.clone(), &World::seed(), start_seed_fill(&now, None)).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn a_fill_pod_the_api_server_refuses_is_reported_on_the_claim() {
    // E.g. a resources.limits smaller than its requests in generic.resources.
    let why = "Pod \"populate-x\" is invalid: spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit";
    let world = World::seed().prime(prime("Bound", Some("d-pv-1")));
    let script = vec![
        expect(Method::POST, pods_path(), Reply::Invalid(why)),
        event_where("PodRejected", move |note| {
            assert!(note.contains(why), "{note}");
            assert!(note.contains(&format!("{OURS}/populate-{UID}")), "{note}");
        }),
    ];
    let (result, metrics) = run_result(finalized(user_pvc()), &world, script).await;
    assert!(result.is_err(), "retried by the error policy: {result:?}");
    assert!(metrics.render().contains("fillfs_populations_in_flight 0"));
}

#[tokio::test]
async fn a_populator_in_another_namespace_is_refused_without_reading_it() {
    let cross = with(user_pvc(), "/spec/dataSourceRef/namespace", json!("data"));
    // Even when the watch shows one there: it is not used.
    let mut theirs = cr_json(&seed_cr());
    theirs["metadata"]["namespace"] = json!("data");
    let world = World::seed().populator(theirs);
    let script = vec![
        event_where("InvalidClaim", |note| {
            assert!(note.contains("dataSourceRef.namespace \"data\""), "{note}");
        }),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(user_pvc())).check(|b| {
            assert!(b["metadata"]["annotations"]["fillfs.io/invalid"].is_string());
        }),
    ];
    let (action, _) = run(cross, &world, script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn pvcs_that_are_not_ours_cause_no_requests() {
    let world = World::seed();
    let plain = with(user_pvc(), "/spec/dataSourceRef", Value::Null);
    assert_eq!(run(plain, &world, vec![]).await.0, Action::await_change());
    let other_kind = with(
        user_pvc(),
        "/spec/dataSourceRef/kind",
        json!("VolumeSnapshot"),
    );
    assert_eq!(
        run(other_kind, &world, vec![]).await.0,
        Action::await_change()
    );
    let in_our_namespace = with(user_pvc(), "/metadata/namespace", json!(OURS));
    assert_eq!(
        run(in_our_namespace, &world, vec![]).await.0,
        Action::await_change()
    );
    let bound_elsewhere = with(user_pvc(), "/spec/volumeName", json!("pv-9"));
    assert_eq!(
        run(bound_elsewhere, &world, vec![]).await.0,
        Action::await_change()
    );
}

// ---- events: every distinct failure, cut to the API's limit ----

#[tokio::test]
async fn one_event_writer_publishes_every_distinct_failure_of_a_claim() {
    // kube's Recorder grouped these by reason and showed attempt 1's note with a count;
    // each attempt's start and failure, and the final "giving up", must be its own event,
    // though the fill fails the same way every time. One writer, as in the controller.
    let mut api = Session::new();
    let notes = Arc::new(Mutex::new(Vec::<String>::new()));
    let msg = "fillfs: error: cannot reach https://oss: connection reset";
    let gone = World::seed().prime(prime("Bound", Some("d-pv-1")));
    let mut pvc = user_pvc();
    for attempt in 1..=3u32 {
        // Start (attempt 1: a new claim; then once the backoff is over).
        let all = notes.clone();
        let started = event_where("FillStarted", move |note| {
            assert!(
                note.starts_with(&format!("attempt {attempt} of 3: filling from")),
                "{note}"
            );
            all.lock().unwrap().push(note.to_string());
        });
        let (world, script) = if attempt == 1 {
            let mut script = start_seed_fill(&pvc, None);
            script[3] = started;
            (World::seed(), script)
        } else {
            pvc = annotated(
                pvc,
                json!({"fillfs.io/retry-after": "2026-01-01T00:00:00Z"}),
            );
            let script = vec![
                pod_post(None, FillPath::Direct, assert_direct_rrsa_pod),
                started,
                in_flight_patch(1),
            ];
            (gone.clone(), script)
        };
        let action = api.reconcile(pvc.clone(), &world, script).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
        if attempt == 1 {
            pvc = finalized(pvc);
        }

        // Its pod fails.
        let failed = with(
            pod("Failed", Some((1, msg))),
            "/metadata/uid",
            json!(format!("pod-uid-{attempt}")),
        );
        let decided = Arc::new(Mutex::new(Value::Null));
        let seen = decided.clone();
        let all = notes.clone();
        let mut script = vec![
            expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(move |b| {
                *seen.lock().unwrap() = b["metadata"]["annotations"].clone();
            }),
            expect(Method::DELETE, pod_path(), Reply::Json(pod("Failed", None))),
            event_where("FillFailed", move |note| {
                assert!(
                    note.starts_with(&format!("attempt {attempt} of 3")),
                    "{note}"
                );
                assert!(note.contains(msg), "{note}");
                let ending = match attempt {
                    1 => "retrying in 10s",
                    2 => "retrying in 20s",
                    _ => "the fill failed 3 times, giving up",
                };
                assert!(note.contains(ending), "{note}");
                all.lock().unwrap().push(note.to_string());
            }),
        ];
        script.push(if attempt < 3 {
            in_flight_patch(0)
        } else {
            count_patch(json!({"failed": 1, "inFlight": 0}))
        });
        let action = api
            .reconcile(pvc.clone(), &with_pod(failed), script)
            .await
            .unwrap();
        let expected = match attempt {
            1 => Action::requeue(Duration::from_secs(10)),
            2 => Action::requeue(Duration::from_secs(20)),
            _ => Action::await_change(),
        };
        assert_eq!(action, expected, "attempt {attempt}");
        let annotations = decided.lock().unwrap().clone();
        pvc = annotated(pvc, annotations);
    }
    let notes = notes.lock().unwrap().clone();
    assert_eq!(notes.len(), 6, "{notes:#?}");
    let distinct: std::collections::BTreeSet<&String> = notes.iter().collect();
    assert_eq!(distinct.len(), 6, "{notes:#?}");
    assert_eq!(pvc["metadata"]["annotations"]["fillfs.io/failed"], msg);
}

#[tokio::test]
async fn a_note_over_one_kib_is_cut_to_the_limit() {
    // A termination message whose last line is 3 KiB of two-byte characters.
    let long = format!("fillfs: error: {}", "é".repeat(1500));
    let world = with_pod(pod("Failed", Some((1, &long))));
    let pvc = finalized(user_pvc());
    let script = vec![
        expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())),
        expect(Method::DELETE, pod_path(), Reply::Json(pod("Failed", None))),
        event_where("FillFailed", |note| {
            assert!(note.len() <= 1024, "{} bytes", note.len());
            assert!(
                note.len() >= 1024 - 4,
                "cut, not dropped: {} bytes",
                note.len()
            );
            assert!(note.ends_with("..."), "{note}");
            assert!(
                note.starts_with("attempt 1 of 3 failed (exit 1): fillfs: error: éé"),
                "{note}"
            );
        }),
        in_flight_patch(0),
    ];
    let (action, _) = run(pvc, &world, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

// ---- the claim's StorageClass ----

#[tokio::test]
async fn a_missing_storage_class_is_waited_for_and_an_empty_one_refused_once() {
    // The class does not exist (yet): an event, a look again in 30 s, nothing written.
    let no_class = World {
        classes: vec![],
        ..World::seed()
    };
    let script = vec![event_where("StorageClassNotFound", |note| {
        assert!(note.contains("\"alicloud-disk-essd\""), "{note}");
    })];
    let (action, _) = run(user_pvc(), &no_class, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));

    // storageClassName "": a claim on an unclassed PV, which a fill cannot make.
    let empty = with(user_pvc(), "/spec/storageClassName", json!(""));
    let said = Arc::new(Mutex::new(String::new()));
    let seen = said.clone();
    let script = vec![
        event_where("InvalidClaim", |note| {
            assert!(note.contains("storageClassName \"\""), "{note}");
        }),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(empty.clone())).check(move |b| {
            *seen.lock().unwrap() = b["metadata"]["annotations"]["fillfs.io/invalid"]
                .as_str()
                .unwrap()
                .to_string();
        }),
    ];
    let (action, _) = run(empty.clone(), &World::seed(), script).await;
    assert_eq!(action, Action::await_change());
    // Once: with the annotation on the claim, the next reconcile writes nothing.
    let reason = said.lock().unwrap().clone();
    assert!(reason.contains("storageClassName"), "{reason}");
    let annotated_empty = annotated(empty, json!({"fillfs.io/invalid": reason}));
    let (action, _) = run(annotated_empty, &World::seed(), vec![]).await;
    assert_eq!(action, Action::await_change());

    // No storageClassName at all: the default class, nothing to look up.
    let default_class = with(user_pvc(), "/spec/storageClassName", Value::Null);
    let mut script = start_seed_fill(&default_class, None);
    script[1] = expect(Method::POST, primes_path(), Reply::Echo)
        .check(|b| assert!(b["spec"].get("storageClassName").is_none(), "{b}"));
    let (action, _) = run(default_class, &no_class, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn a_fill_under_way_finishes_though_its_storage_class_is_gone() {
    // PVC' was provisioned and the fill succeeded; the class was deleted meanwhile (or is
    // being re-created with new parameters). The volume exists: it is handed over.
    let world = World {
        classes: vec![],
        ..with_pod(pod("Succeeded", Some((0, ""))))
    };
    let script = vec![
        expect(
            Method::GET,
            "/api/v1/persistentvolumes/d-pv-1",
            Reply::Json(pv("prime-uid-1")),
        ),
        expect(
            Method::PATCH,
            "/api/v1/persistentvolumes/d-pv-1",
            Reply::Json(pv(UID)),
        ),
    ];
    let (action, _) = run(finalized(user_pvc()), &world, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
}

// ---- a fill pod that does not start ----

#[tokio::test]
async fn a_fill_pod_that_does_not_start_is_explained_on_the_claim() {
    let pvc = finalized(user_pvc());
    let mut api = Session::new();
    // Its image cannot be pulled: said on the claim, once per note.
    let stuck = waiting_pod(
        "ImagePullBackOff",
        "Back-off pulling image \"ghcr.io/fillfs/fillfs:test\"",
        20,
    );
    let script = vec![event_where("FillPodNotStarting", |note| {
        assert!(
            note.contains("ImagePullBackOff") && note.contains("Back-off pulling image"),
            "{note}"
        );
    })];
    let world = with_pod(stuck);
    let action = api.reconcile(pvc.clone(), &world, script).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    // The next poll, same state: the same note is not written again.
    let action = api.reconcile(pvc.clone(), &world, vec![]).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));

    // It cannot be scheduled.
    let mut unschedulable = pod("Pending", None);
    unschedulable["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "False",
        "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient memory."}]);
    let script = vec![event_where("FillPodUnschedulable", |note| {
        assert!(note.contains("0/3 nodes are available"), "{note}");
    })];
    run(pvc.clone(), &with_pod(unschedulable), script).await;

    // Pending for a while, nothing in its own status: the warnings about the pod and
    // PVC' in our namespace (kubelet's, the provisioner's) are repeated on the claim.
    let creating = waiting_pod("ContainerCreating", "", 20);
    let (action, _) = run(pvc.clone(), &with_pod(creating), vec![]).await;
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(10)),
        "young: nothing to say yet"
    );
    let old = waiting_pod("ContainerCreating", "", 300);
    let warning = |uid: &str, kind: &str, name: &str, reason: &str, message: &str| {
        json!({"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": [{
            "metadata": {"name": format!("{name}.1"), "namespace": OURS},
            "involvedObject": {"kind": kind, "namespace": OURS, "name": name, "uid": uid},
            "reason": reason, "message": message, "type": "Warning", "count": 4
        }]})
    };
    let events_path = format!("/api/v1/namespaces/{OURS}/events");
    let script = vec![
        expect(
            Method::GET,
            events_path.clone(),
            Reply::Json(warning(
                "pod-uid-1",
                "Pod",
                &format!("populate-{UID}"),
                "FailedMount",
                "MountVolume.SetUp failed for volume \"target\": timed out",
            )),
        )
        .param("fieldSelector", "involvedObject.uid=pod-uid-1,type=Warning"),
        event_where("FailedMount", |note| {
            assert_eq!(
                note,
                format!(
                    "fill pod populate-{UID} in {OURS}: MountVolume.SetUp failed for volume \"target\": timed out"
                )
            );
        }),
        expect(
            Method::GET,
            events_path,
            Reply::Json(warning(
                "prime-uid-1",
                "PersistentVolumeClaim",
                &format!("prime-{UID}"),
                "ProvisioningFailed",
                "failed to provision volume with StorageClass \"alicloud-disk-essd\": InvalidParameter",
            )),
        )
        .param("fieldSelector", "involvedObject.uid=prime-uid-1,type=Warning"),
        event_where("ProvisioningFailed", |note| {
            assert!(
                note.starts_with(&format!("temporary claim prime-{UID} in {OURS}: ")),
                "{note}"
            );
            assert!(note.contains("InvalidParameter"), "{note}");
        }),
    ];
    let (action, _) = run(pvc, &with_pod(old), script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn an_evicted_pod_says_it_was_evicted() {
    let why = "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 2Gi.";
    let mut evicted = pod("Failed", None);
    evicted["status"]["reason"] = json!("Evicted");
    evicted["status"]["message"] = json!(why);
    let pvc = finalized(user_pvc());
    let script = vec![
        expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(|b| {
            let a = &b["metadata"]["annotations"];
            assert_eq!(a["fillfs.io/attempts"], "1");
            assert!(a["fillfs.io/retry-after"].is_string(), "{a}");
            assert!(a.get("fillfs.io/failed").is_none(), "transient: {a}");
        }),
        expect(Method::DELETE, pod_path(), Reply::Json(pod("Failed", None))),
        event_where("FillFailed", move |note| {
            assert!(note.contains(&format!("pod Evicted: {why}")), "{note}");
            assert!(note.contains("did not run to an exit"), "{note}");
        }),
        in_flight_patch(0),
    ];
    let (action, _) = run(pvc, &with_pod(evicted), script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

// ---- creates the API server refuses, or has done already ----

#[tokio::test]
async fn a_temporary_claim_the_api_server_refuses_is_reported_on_the_claim() {
    let quota = format!(
        "persistentvolumeclaims \"prime-{UID}\" is forbidden: exceeded quota: storage, requested: requests.storage=20Gi, used: requests.storage=90Gi, limited: requests.storage=100Gi"
    );
    let expected = quota.clone();
    let script = vec![
        finalizer_patch(&user_pvc()),
        expect(Method::POST, primes_path(), Reply::Forbidden(quota)),
        event_where("PrimeClaimRejected", move |note| {
            assert!(note.contains(&expected), "{note}");
            assert!(note.contains(&format!("{OURS}/prime-{UID}")), "{note}");
        }),
    ];
    let (result, _) = run_result(user_pvc(), &World::seed(), script).await;
    assert!(result.is_err(), "retried by the error policy: {result:?}");
}

#[tokio::test]
async fn creates_the_stores_do_not_show_yet_are_done() {
    // PVC' exists, the store does not show it yet: the fill goes on.
    let script = vec![
        finalizer_patch(&user_pvc()),
        expect(Method::POST, primes_path(), Reply::AlreadyExists),
        pod_post(None, FillPath::Direct, assert_direct_rrsa_pod),
        fill_started(FillPath::Direct, "virtual nodes"),
        in_flight_patch(1),
    ];
    let (action, _) = run(user_pvc(), &World::seed(), script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    // The pod exists: it was started (and said so) by the reconcile that created it.
    let world = World::seed().prime(prime("Bound", None));
    let script = vec![expect(Method::POST, pods_path(), Reply::AlreadyExists)];
    let (action, _) = run(finalized(user_pvc()), &world, script).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

// ---- the fill path ----

#[tokio::test]
async fn the_fill_path_follows_the_placement_and_the_annotation() {
    let plain = cr_json(&plain_cr());
    let with_plugin = |w: World| {
        w.csinode(
            "node-1",
            &["csi.fillfs.io", "diskplugin.csi.alibabacloud.com"],
        )
    };
    let node_rrsa = |b: &Value| {
        assert_node_pod(b, None);
        let attrs = &volume(b, "source")["csi"]["volumeAttributes"];
        assert_eq!(attrs["roleArn"], "acs:ram::123456789012:role/oss-populator");
        assert_eq!(
            attrs["oidcProviderArn"],
            "acs:ram::123456789012:oidc-provider/my-oidc-provider"
        );
    };

    // The seed (ACS): direct, though a node has the plugin.
    let world = with_plugin(World::seed());
    let script = start_fill(
        &user_pvc(),
        None,
        FillPath::Direct,
        "virtual nodes (label alibabacloud.com/acs: \"true\")",
        assert_direct_rrsa_pod,
    );
    run(user_pvc(), &world, script).await;

    // Ordinary nodes, one with the plugin: the node path.
    let world = with_plugin(World::seed().populator(plain.clone()));
    let script = start_fill(&user_pvc(), None, FillPath::Node, "registered", node_rrsa);
    run(user_pvc(), &world, script).await;

    // No node has it: direct.
    let without = World::seed()
        .populator(plain.clone())
        .csinode("node-1", &["diskplugin.csi.alibabacloud.com"]);
    let script = start_fill(
        &user_pvc(),
        None,
        FillPath::Direct,
        "no node has the fillfs node plugin",
        assert_direct_rrsa_pod,
    );
    run(user_pvc(), &without, script).await;

    // The claim's node decides once there is one: node-7 lacks it (node-1 has it).
    let on_node_7 = annotated(
        user_pvc(),
        json!({"volume.kubernetes.io/selected-node": "node-7"}),
    );
    let wffc = with_plugin(
        World::seed()
            .populator(plain.clone())
            .class(storage_class("WaitForFirstConsumer")),
    );
    let world = wffc
        .clone()
        .csinode("node-7", &["diskplugin.csi.alibabacloud.com"]);
    let script = start_fill(
        &on_node_7,
        Some("node-7"),
        FillPath::Direct,
        "the claim's node has no fillfs node plugin",
        assert_direct_rrsa_pod,
    );
    run(on_node_7.clone(), &world, script).await;
    let world = wffc.csinode("node-7", &["csi.fillfs.io"]);
    let script = start_fill(
        &on_node_7,
        Some("node-7"),
        FillPath::Node,
        "registered",
        node_rrsa,
    );
    run(on_node_7, &world, script).await;

    // The claim's annotation wins over ACS...
    let wants_node = annotated(user_pvc(), json!({"fillfs.io/fill-path": "node"}));
    let script = start_fill(
        &wants_node,
        None,
        FillPath::Node,
        "fillfs.io/fill-path: node on the claim",
        node_rrsa,
    );
    run(wants_node, &World::seed(), script).await;
    // ... the populator's over CSINode ...
    let mut annotated_cr = plain_cr();
    annotated_cr.metadata.annotations =
        Some([("fillfs.io/fill-path".to_string(), "direct".to_string())].into());
    let world = with_plugin(World::seed().populator(cr_json(&annotated_cr)));
    let script = start_fill(
        &user_pvc(),
        None,
        FillPath::Direct,
        "fillfs.io/fill-path: direct on the populator",
        assert_direct_rrsa_pod,
    );
    run(user_pvc(), &world, script).await;
    // ... and "auto" is the placement's choice.
    let auto = annotated(user_pvc(), json!({"fillfs.io/fill-path": "auto"}));
    let world = with_plugin(World::seed().populator(plain));
    let script = start_fill(&auto, None, FillPath::Node, "registered", node_rrsa);
    run(auto, &world, script).await;

    // Anything else is a problem of the claim: said once, nothing created.
    let fuse = annotated(user_pvc(), json!({"fillfs.io/fill-path": "fuse"}));
    let said = Arc::new(Mutex::new(String::new()));
    let seen = said.clone();
    let script = vec![
        event_where("InvalidClaim", |note| {
            assert!(
                note.contains("fillfs.io/fill-path") && note.contains("\"fuse\""),
                "{note}"
            );
        }),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(fuse.clone())).check(move |b| {
            let why = b["metadata"]["annotations"]["fillfs.io/invalid"]
                .as_str()
                .unwrap();
            assert!(why.contains("\"fuse\""), "{why}");
            *seen.lock().unwrap() = why.to_string();
        }),
    ];
    let (action, _) = run(fuse.clone(), &World::seed(), script).await;
    assert_eq!(action, Action::await_change());
    // Once: the reconcile the annotation wakes writes nothing (the annotation is not
    // cleared as "fixed" and set again, round after round).
    let reason = said.lock().unwrap().clone();
    let said = annotated(fuse, json!({"fillfs.io/invalid": reason}));
    let (action, _) = run(said, &World::seed(), vec![]).await;
    assert_eq!(action, Action::await_change());
}

// ---- golden files, CRD, seed examples ----

fn golden(name: &str, actual: &str) {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (UPDATE_GOLDEN=1 writes it)"));
    assert_eq!(
        actual, expected,
        "{name} changed; review and rerun with UPDATE_GOLDEN=1"
    );
}

#[test]
fn generated_prime_pvc_and_pods_match_golden_files() {
    let pvc = pvc_from(&user_pvc());
    golden(
        "prime-pvc.yaml",
        &serde_yaml_ng::to_string(&objects::prime_pvc(
            &pvc,
            &seed_cr(),
            &settings(),
            Some("node-7"),
        ))
        .unwrap(),
    );
    // Node path: a pod on an ordinary node that has the node plugin.
    golden(
        "fill-pod.yaml",
        &serde_yaml_ng::to_string(&objects::fill_pod(
            &pvc,
            &plain_cr(),
            &settings(),
            &FillSpec {
                path: FillPath::Node,
                selected_node: Some("node-7"),
                secret: None,
            },
        ))
        .unwrap(),
    );
    // Direct path: the seed populator's pod on ACS, with its RRSA token.
    golden(
        "fill-pod-direct.yaml",
        &serde_yaml_ng::to_string(&objects::fill_pod(
            &pvc,
            &seed_cr(),
            &settings(),
            &FillSpec {
                path: FillPath::Direct,
                selected_node: None,
                secret: None,
            },
        ))
        .unwrap(),
    );
}

#[test]
fn a_direct_fill_without_credentials_reads_unsigned() {
    // Like a CSI volume without credentials: anonymous, never an ambient identity.
    let mut cr = seed_cr();
    cr.spec.generic.as_mut().unwrap().rrsa_configs = None;
    cr.spec.throughput = Some(1000);
    let pod = serde_json::to_value(objects::fill_pod(
        &pvc_from(&user_pvc()),
        &cr,
        &settings(),
        &FillSpec {
            path: FillPath::Direct,
            selected_node: None,
            secret: None,
        },
    ))
    .unwrap();
    assert_eq!(
        container(&pod)["args"],
        direct_args(&["--throughput", "953.674", "--no-sign-request"])
    );
    assert!(
        env_of(&pod)
            .keys()
            .all(|k| !k.starts_with("ALIBABA_CLOUD_")),
        "{pod}"
    );
    assert!(volume(&pod, "rrsa-token").is_null());
}

#[test]
fn argo_length_claim_names_stay_out_of_label_values() {
    assert!(
        PVC.len() > 63,
        "the test needs a name longer than a label value"
    );
    let pvc = pvc_from(&user_pvc());
    let mut cr = seed_cr();
    // As long as the API allows an object name to be.
    cr.metadata.name = Some(format!("populator-{}", "x".repeat(200)));
    let prime = objects::prime_pvc(&pvc, &cr, &settings(), Some("node-7"));
    let pod = objects::fill_pod(
        &pvc,
        &cr,
        &settings(),
        &FillSpec {
            path: FillPath::Node,
            selected_node: None,
            secret: Some("populate-x"),
        },
    );
    let secret = objects::copied_secret(&Default::default(), &pvc, &cr, &settings());
    for (what, meta) in [
        ("PVC'", &prime.metadata),
        ("pod", &pod.metadata),
        ("secret", &secret.metadata),
    ] {
        assert_valid_labels(&serde_json::to_value(meta).unwrap(), what);
        assert_eq!(
            objects::owner_of(meta),
            Some((NS.to_string(), PVC.to_string())),
            "{what}: maps back to the claim"
        );
        assert_eq!(meta.labels.as_ref().unwrap()["fillfs.io/pvc-uid"], UID);
        assert_eq!(
            meta.annotations.as_ref().unwrap()["fillfs.io/populator"],
            format!("argo/{}", cr.metadata.name.as_ref().unwrap())
        );
    }
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()["alibabacloud.com/acs"],
        "true"
    );
}

#[test]
fn populator_labels_and_node_selectors_are_checked_as_the_api_server_would() {
    use std::collections::BTreeMap;
    let mut ok = seed_cr();
    let generic = ok.spec.generic.as_mut().unwrap();
    generic
        .labels
        .insert("example.com/a_b-c.d".into(), String::new());
    generic.node_selector = BTreeMap::from([(
        "node.kubernetes.io/instance-type".into(),
        "ecs.g7.large".into(),
    )]);
    ok.spec.validate().expect("valid labels pass");

    let long_value = "v".repeat(64);
    let cases: Vec<(&str, &str, &str, bool)> = vec![
        (
            "team",
            &long_value,
            "at most 63 characters (this one has 64)",
            false,
        ),
        ("Example.COM/x", "y", "not a DNS subdomain", false),
        ("x/", "y", "1-63 characters", false),
        ("x", "-y", "beginning and ending alphanumeric", false),
        ("fillfs.io/pvc-uid", "u", "set by the controller", false),
        (
            "app.kubernetes.io/managed-by",
            "me",
            "set by the controller",
            false,
        ),
        ("zone", &long_value, "nodeSelector", true),
    ];
    for (k, v, want, node_selector) in cases {
        let mut cr = seed_cr();
        let generic = cr.spec.generic.as_mut().unwrap();
        if node_selector {
            generic.node_selector.insert(k.into(), v.into());
        } else {
            generic.labels.insert(k.into(), v.into());
        }
        let err = cr.spec.validate().expect_err(k);
        assert!(err.contains(want), "{k}={v}: {err}");
    }
}

#[test]
fn committed_crd_equals_fillfs_crd() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crd.yaml")).unwrap();
    let generated = fillfs::controller::crd_yaml();
    let body = committed
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        body.trim_end(),
        generated.trim_end(),
        "run: fillfs crd > deploy/crd.yaml (keep the header)"
    );
}

#[test]
fn seed_examples_deserialize_and_validate_against_the_schema() {
    // The populator: into our types, through our checks, and against the CRD's schema.
    let cr = seed_cr();
    cr.spec.validate().expect("the seed spec is valid");
    assert_eq!(cr.spec.bucket, "my-test-bucket");
    assert_eq!(cr.spec.path, "/many-files/");
    let rrsa = cr
        .spec
        .generic
        .as_ref()
        .unwrap()
        .rrsa_configs
        .as_ref()
        .unwrap();
    assert_eq!(rrsa.role_arn, "acs:ram::123456789012:role/oss-populator");

    let crd: Value =
        serde_json::to_value(<OSSVolumePopulator as kube::CustomResourceExt>::crd()).unwrap();
    let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/seed-ossvolumepopulator.yaml"
    ))
    .unwrap();
    let raw: Value = serde_yaml_ng::from_str(&text).unwrap();
    let errors: Vec<String> = validator.iter_errors(&raw).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "seed example vs schema: {errors:?}");
    // The schema can fail: a bucket too short and a zero throughput are refused.
    let mut bad = raw.clone();
    bad["spec"]["bucket"] = json!("ab");
    bad["spec"]["throughput"] = json!(0);
    assert_eq!(validator.iter_errors(&bad).count(), 2);

    // The workflow's claim template points at this populator.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/seed-argo-workflow.yaml"
    ))
    .unwrap();
    let wf: Value = serde_yaml_ng::from_str(&text).unwrap();
    let template = &wf["spec"]["volumes"][0]["ephemeral"]["volumeClaimTemplate"];
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "wf-scratch", "namespace": "argo"},
        "spec": template["spec"],
    }))
    .expect("the claim template is a PVC spec");
    assert_eq!(
        populator_ref(&pvc),
        Some(("argo".into(), "generic-demo".into()))
    );
}

#[test]
fn the_fill_pods_csi_volume_is_accepted_by_the_csi_plugin() {
    // What kubelet would pass to NodePublishVolume for the generated pod's source volume.
    let node = FillSpec {
        path: FillPath::Node,
        selected_node: None,
        secret: None,
    };
    let pod = objects::fill_pod(&pvc_from(&user_pvc()), &seed_cr(), &settings(), &node);
    let source = |pod: k8s_openapi::api::core::v1::Pod| {
        pod.spec
            .unwrap()
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "source")
            .and_then(|v| v.csi)
            .expect("the source volume")
    };
    let csi = source(pod);
    assert_eq!(csi.driver, fillfs::csi::DRIVER_NAME);
    let mut context: std::collections::HashMap<String, String> =
        csi.volume_attributes.unwrap().into_iter().collect();
    context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    context.insert(
        "csi.storage.k8s.io/serviceAccount.tokens".into(),
        r#"{"sts.aliyuncs.com":{"token":"header.payload.sig","expirationTimestamp":"2026-11-23T11:00:00Z"}}"#.into(),
    );
    let spec = fillfs::csi::volume::parse(&context, &Default::default()).expect("accepted");
    assert_eq!(
        spec.store.source.to_string(),
        "oss://my-test-bucket/many-files/"
    );
    // (The CSI side may spell it with its scheme.)
    assert_eq!(
        spec.store
            .endpoint
            .as_deref()
            .map(|e| e.trim_start_matches("https://")),
        Some("oss-cn-hangzhou-internal.aliyuncs.com")
    );
    assert_eq!(
        spec.store.credentials.rrsa.unwrap().role_arn,
        "acs:ram::123456789012:role/oss-populator"
    );

    // throughput is MB/s in the populator and MiB/s in the volume.
    let mut cr = seed_cr();
    cr.spec.throughput = Some(1000);
    let pod = objects::fill_pod(&pvc_from(&user_pvc()), &cr, &settings(), &node);
    let attrs = source(pod).volume_attributes.unwrap();
    assert_eq!(attrs["throughput"], "953.674");
}
