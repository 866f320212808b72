//! The volume populator's API load is linear in the number of claims.
//!
//! The issue this pins: every populator status write (`inFlight`, `succeeded`) used to wake
//! every in-flight claim, and each of those reconciles read ≈5 objects from the API (the
//! fill pod's log among them): O(N²) requests for N parallel fills. Now reconciles read
//! from reflector stores ([`Stores`]) and the populator watch passes only generation
//! changes (`predicates::generation`), so a status write wakes no claim.
//!
//! No API server here: [`FakeApi`] is a small in-memory stand-in behind a real
//! `kube::Client` (GET, create with generateName, merge and JSON patch with
//! resourceVersion preconditions, the status subresource, DELETE, event lists, pod logs)
//! that counts every request the controller makes, by method and kind. [`Sim`] plays the
//! rest of the cluster in virtual time: the user creating claims, the provisioner binding
//! PVC', the scheduler and kubelet running the fill pod, the PV controller binding the
//! user's claim to the PV the controller handed over. After every reconcile it delivers
//! what changed to the controller's stores and turns the changes into triggers the way
//! `controller::run` wires its watches: a PVC's own changes, its fill pod's changes
//! (mapped back through the pod's annotations), and a populator change only when
//! `predicates::generation` lets it through. Requeues (`Action::requeue`) are timers; a
//! trigger replaces a later timer (one schedule entry per object, earlier wins), as in
//! kube-runtime's scheduler.
//!
//! Tokio's clock follows the virtual one: the tests run on a current-thread runtime with
//! time paused, and [`Sim::follow`] advances it to the virtual instant before every
//! reconcile. The controller times one thing with it, `Memo::log_read_due` (a fill pod's
//! log is not read again within `poll / 2`), so the reconcile a progress patch wakes at
//! once skips the log read as it does in a cluster. The [`Context`] (and its `memo`) is one
//! per run and outlives reconciles, as the real controller's does.
//!
//! Claims arrive 100 ms apart and every fill runs 40 s, so all N claims are in flight at
//! once (N × 100 ms < 40 s for N ≤ 200): every populator status write happens while the
//! other fills run and are polled, which is when waking them would cost a reconcile each.
//! The `every_status_write_wakes_every_claim` run wires the populator watch as it was
//! before (no predicate) and shows the growth this test guards against (in reconciles: the
//! log-read memo and the `inFlight` memo now keep most of those wakes off the API).
//!
//! The burst runs put all claims at the same instant and reconcile the claims due at an
//! instant concurrently, from stores that see a round's writes only after it: requests stay
//! linear, and since status writes of a populator are serialized in-process the shared
//! status adds up (`a_burst_of_claims_is_counted`). Results:
//! bench/results/controller-scale.md.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use fillfs::controller::crd::OSSVolumePopulator;
use fillfs::controller::events::Events;
use fillfs::controller::metrics::Metrics;
use fillfs::controller::objects::{self, Settings};
use fillfs::controller::reconcile::{Context, ReconcileError, Stores, populator_ref, reconcile};
use fillfs::populate::ProgressLine;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass};
use k8s_openapi::jiff;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::predicates;
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};

const NS: &str = "argo";
const OURS: &str = "fillfs-system";
const DRIVER: &str = "csi.fillfs.io";
const CLASS: &str = "alicloud-disk-essd";
const NODE: &str = "node-1";
const POPULATOR: &str = "generic-demo";

/// Virtual milliseconds between two claims' creation.
const GAP_MS: u64 = 100;
/// How long a fill pod runs, virtual milliseconds.
const FILL_MS: u64 = 40_000;
/// The controller's progress poll.
const POLL: Duration = Duration::from_secs(10);
/// A fill's size (for the progress lines).
const BYTES: u64 = 8 << 30;

fn settings() -> Settings {
    Settings {
        namespace: OURS.into(),
        image: "ghcr.io/fillfs/fillfs:test".into(),
        service_account: "fillfs-populate".into(),
        csi_driver: DRIVER.into(),
        fill_deadline: Duration::from_secs(3600),
    }
}

/// The source article's populator (deploy/examples), as JSON.
fn seed_cr() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/seed-ossvolumepopulator.yaml"
    ))
    .unwrap();
    let cr: OSSVolumePopulator = serde_yaml_ng::from_str(&text).expect("the seed deserializes");
    serde_json::to_value(cr).unwrap()
}

/// The seed without its ACS labels: ordinary nodes, where CSINode decides (node path).
fn seed_cr_on_nodes() -> Value {
    let mut cr = seed_cr();
    cr["spec"]["generic"]
        .as_object_mut()
        .unwrap()
        .remove("labels");
    cr
}

/// The `i`th claim, named as Argo names an ephemeral claim (78 characters).
fn claim_name(i: usize) -> String {
    format!("parallel-data-process-with-ossvp-x7k2p-echo-template-{i:010}-scratch-volume")
}

fn user_claim(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim_name(i), "namespace": NS, "labels": {"diskType": "scratch-volume"}},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": CLASS,
            "resources": {"requests": {"storage": "20Gi"}},
            "dataSourceRef": {"apiGroup": "storage.alibabacloud.com", "kind": "OSSVolumePopulator", "name": POPULATOR}
        }
    })
}

fn cr_path(name: &str) -> String {
    format!("/apis/storage.alibabacloud.com/v1beta1/namespaces/{NS}/ossvolumepopulators/{name}")
}

fn claim_path(ns: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}")
}

// ---------------------------------------------------------------------------------------
// The API-server stand-in.

/// Where a request (or a stored object) is, from its path.
#[derive(Debug, Clone)]
struct Route {
    /// The collection: `/api/v1/namespaces/argo/pods`.
    collection: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Route {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (base, rest) = match segs.first() {
            Some(&"api") => (format!("/{}/{}", segs[0], segs[1]), &segs[2..]),
            Some(&"apis") => (format!("/{}/{}/{}", segs[0], segs[1], segs[2]), &segs[3..]),
            _ => panic!("not an API path: {path}"),
        };
        let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
            (Some(rest[1].to_string()), &rest[2..])
        } else {
            (None, rest)
        };
        let collection = match &namespace {
            Some(ns) => format!("{base}/namespaces/{ns}/{}", rest[0]),
            None => format!("{base}/{}", rest[0]),
        };
        Route {
            collection,
            resource: rest[0].to_string(),
            namespace,
            name: rest.get(1).map(|s| s.to_string()),
            sub: rest.get(2).map(|s| s.to_string()),
        }
    }

    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.collection,
            self.name.as_deref().unwrap_or_default()
        )
    }

    /// The kind a request is counted under: the resource, its subresource, and for PVCs
    /// whose they are (a user's claim or our PVC').
    fn kind(&self) -> String {
        let mut k = self.resource.clone();
        if k == "persistentvolumeclaims" {
            k = if self.namespace.as_deref() == Some(OURS) {
                "persistentvolumeclaims (PVC')".into()
            } else {
                "persistentvolumeclaims (claim)".into()
            };
        }
        if let Some(s) = &self.sub {
            k = format!("{k}/{s}");
        }
        k
    }
}

/// A change since the stores last saw the stand-in: an object written, or deleted (with
/// its last state, as a watch's Delete event carries it).
#[derive(Debug, Clone)]
enum Change {
    Applied(String),
    Deleted(String, Value),
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    changes: Vec<Change>,
    /// Requests by "METHOD kind".
    counts: BTreeMap<String, u64>,
    resource_version: u64,
    serial: u64,
    /// Virtual time, ms (the log's progress depends on it).
    now: u64,
    /// Fill pod name -> when it started running (virtual ms).
    running_since: HashMap<String, u64>,
    succeeded: HashSet<String>,
    /// Events created (reason, regarding name).
    events: Vec<(String, String)>,
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn reply(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn failure(code: u16, reason: &str, message: &str) -> Response<Body> {
    reply(
        StatusCode::from_u16(code).unwrap(),
        &status_json(code, reason, message),
    )
}

/// RFC 7386: objects merge, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// RFC 6902 `test`, `remove`, `add`, `replace` (what `drop_finalizer` sends).
fn json_patch(target: &mut Value, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let path = op["path"].as_str().ok_or("op without path")?;
        let tokens: Vec<String> = path.split('/').skip(1).map(unescape).collect();
        let (last, parents) = tokens.split_last().ok_or("empty path")?;
        let mut cur = &mut *target;
        for t in parents {
            cur = match cur {
                Value::Object(m) => m.get_mut(t).ok_or(format!("{path}: no {t}"))?,
                Value::Array(a) => {
                    let i: usize = t.parse().map_err(|_| format!("{path}: {t}"))?;
                    a.get_mut(i).ok_or(format!("{path}: no {t}"))?
                }
                _ => return Err(format!("{path}: not a container at {t}")),
            };
        }
        let kind = op["op"].as_str().ok_or("op without op")?;
        match (kind, cur) {
            ("test", Value::Object(m)) => {
                if m.get(last) != Some(&op["value"]) {
                    return Err(format!("test failed at {path}"));
                }
            }
            ("test", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| path.to_string())?;
                if a.get(i) != Some(&op["value"]) {
                    return Err(format!("test failed at {path}"));
                }
            }
            ("remove", Value::Object(m)) => {
                m.remove(last).ok_or(format!("remove: no {path}"))?;
            }
            ("remove", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| path.to_string())?;
                if i >= a.len() {
                    return Err(format!("remove: no {path}"));
                }
                a.remove(i);
            }
            ("add" | "replace", Value::Object(m)) => {
                m.insert(last.clone(), op["value"].clone());
            }
            ("add", Value::Array(a)) => {
                if last == "-" {
                    a.push(op["value"].clone());
                } else {
                    let i: usize = last.parse().map_err(|_| path.to_string())?;
                    a.insert(i, op["value"].clone());
                }
            }
            (k, _) => return Err(format!("unsupported op {k} at {path}")),
        }
    }
    Ok(())
}

/// Resources whose main endpoint ignores `status` (it has its own subresource).
fn has_status_subresource(resource: &str) -> bool {
    matches!(
        resource,
        "pods" | "persistentvolumeclaims" | "persistentvolumes" | "ossvolumepopulators"
    )
}

impl State {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    /// Creates an object as the API server does (uid, resourceVersion, creationTimestamp,
    /// generation); `Err(key)` when it exists.
    fn create(&mut self, route: &Route, mut obj: Value) -> Result<Value, String> {
        self.serial += 1;
        let serial = self.serial;
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        if meta.get("name").is_none_or(Value::is_null) {
            let base = meta["generateName"]
                .as_str()
                .expect("a name or generateName");
            meta.insert("name".into(), json!(format!("{base}{serial:05x}")));
        }
        let name = meta["name"].as_str().unwrap().to_string();
        let key = format!("{}/{name}", route.collection);
        if self.objects.contains_key(&key) {
            return Err(key);
        }
        if let Some(ns) = &route.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{serial:012}")),
        );
        meta.insert(
            "creationTimestamp".into(),
            json!(fillfs::controller::claim::rfc3339_secs(
                jiff::Timestamp::now()
            )),
        );
        meta.insert("generation".into(), json!(1));
        meta.insert("resourceVersion".into(), json!(self.next_rv()));
        match route.resource.as_str() {
            "pods" | "persistentvolumeclaims" => obj["status"] = json!({"phase": "Pending"}),
            "persistentvolumes" => obj["status"] = json!({"phase": "Available"}),
            _ => {}
        }
        self.objects.insert(key.clone(), obj.clone());
        self.changes.push(Change::Applied(key));
        Ok(obj)
    }

    /// A write by someone other than the controller (user, kubelet, provisioner).
    fn write(&mut self, key: &str, f: impl FnOnce(&mut Value)) {
        let rv = self.next_rv();
        let obj = self.objects.get_mut(key).unwrap_or_else(|| panic!("{key}"));
        f(obj);
        obj["metadata"]["resourceVersion"] = json!(rv);
        self.changes.push(Change::Applied(key.to_string()));
    }

    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        ctype: &str,
        body: &[u8],
    ) -> Response<Body> {
        let route = Route::parse(path);
        let key = route.key();
        let sub = route.sub.as_deref();
        let label = match (method, &route.name, sub) {
            (&Method::GET, None, _) => format!("LIST {}", route.kind()),
            (&Method::PATCH, _, _) if ctype.contains("json-patch") => {
                format!("PATCH {} (JSON patch)", route.kind())
            }
            // The populator's status, by what the write is for.
            (&Method::PATCH, _, Some("status")) => {
                let patch: Value = serde_json::from_slice(body).unwrap_or_default();
                let what = if patch["status"]["conditions"].is_array() {
                    "Valid"
                } else if patch["status"]["succeeded"].is_number()
                    || patch["status"]["failed"].is_number()
                {
                    "count"
                } else {
                    "inFlight"
                };
                format!("PATCH {} ({what})", route.kind())
            }
            _ => format!("{method} {}", route.kind()),
        };
        *self.counts.entry(label).or_default() += 1;

        match (method.clone(), &route.name, sub) {
            (Method::GET, None, _) => {
                assert_eq!(
                    route.resource, "events",
                    "only events are listed: {path}?{query}"
                );
                assert!(query.contains("fieldSelector"), "{path}?{query}");
                reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "EventList", "metadata": {"resourceVersion": "1"}, "items": []}),
                )
            }
            (Method::GET, Some(name), Some("log")) => {
                let Some(since) = self.running_since.get(name).copied() else {
                    return failure(400, "BadRequest", "container is not running");
                };
                let done = self.succeeded.contains(name);
                let elapsed = self.now.saturating_sub(since).min(FILL_MS);
                let frac = if done {
                    1.0
                } else {
                    elapsed as f64 / FILL_MS as f64
                };
                let line = ProgressLine {
                    bytes_done: (BYTES as f64 * frac) as u64,
                    bytes_total: BYTES,
                    files_done: (1000.0 * frac) as u64,
                    files_total: 1000,
                    percent: (frac * 1000.0).round() / 10.0,
                    rate_mib_s: 200.0,
                    elapsed_s: elapsed as f64 / 1000.0,
                    done,
                };
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/plain")
                    .body(Body::from(
                        format!("some log line\n{}\n", line.to_line()).into_bytes(),
                    ))
                    .unwrap()
            }
            (Method::GET, Some(_), None) => match self.objects.get(&key) {
                Some(o) => reply(StatusCode::OK, o),
                None => failure(404, "NotFound", &format!("{key} not found")),
            },
            (Method::POST, None, _) => {
                let obj: Value = serde_json::from_slice(body).expect("a JSON body");
                if route.resource == "events" {
                    self.events.push((
                        obj["reason"].as_str().unwrap_or_default().to_string(),
                        obj["regarding"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ));
                }
                match self.create(&route, obj) {
                    Ok(o) => reply(StatusCode::CREATED, &o),
                    Err(k) => failure(409, "AlreadyExists", &format!("{k} already exists")),
                }
            }
            (Method::PATCH, Some(_), sub) => {
                assert!(sub.is_none() || sub == Some("status"), "PATCH {path}");
                let Some(current) = self.objects.get(&key).cloned() else {
                    return failure(404, "NotFound", &format!("{key} not found"));
                };
                let patch: Value = serde_json::from_slice(body).expect("a JSON patch body");
                let mut obj = current.clone();
                if ctype.contains("json-patch") {
                    if let Err(e) = json_patch(&mut obj, patch.as_array().expect("ops")) {
                        return failure(422, "Invalid", &e);
                    }
                } else {
                    assert!(ctype.contains("merge-patch"), "{ctype}");
                    if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                        && current["metadata"]["resourceVersion"].as_str() != Some(rv)
                    {
                        return failure(
                            409,
                            "Conflict",
                            "the object has been modified; please apply your changes to the latest version and try again",
                        );
                    }
                    if sub == Some("status") {
                        merge(&mut obj["status"], &patch["status"]);
                    } else {
                        let mut patch = patch.clone();
                        if has_status_subresource(&route.resource) {
                            patch.as_object_mut().unwrap().remove("status");
                        }
                        merge(&mut obj, &patch);
                    }
                }
                // The server owns these: a patch cannot move them.
                for f in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "name",
                    "namespace",
                ] {
                    obj["metadata"][f] = current["metadata"][f].clone();
                }
                if sub.is_none() && obj["spec"] != current["spec"] {
                    let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
                    obj["metadata"]["generation"] = json!(g + 1);
                }
                obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                self.objects.insert(key.clone(), obj.clone());
                self.changes.push(Change::Applied(key));
                reply(StatusCode::OK, &obj)
            }
            (Method::DELETE, Some(_), None) => match self.objects.remove(&key) {
                Some(o) => {
                    self.changes.push(Change::Deleted(key, o.clone()));
                    reply(StatusCode::OK, &o)
                }
                None => failure(404, "NotFound", &format!("{key} not found")),
            },
            _ => panic!("the stand-in does not answer {method} {path}"),
        }
    }

    fn count(&self, label: &str) -> u64 {
        self.counts.get(label).copied().unwrap_or(0)
    }
}

/// The API server as a `tower::Service`, for `kube::Client::new`.
#[derive(Clone)]
struct FakeApi(Arc<Mutex<State>>);

impl tower::Service<Request<Body>> for FakeApi {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.expect("a request body");
            let ctype = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let res = state.lock().unwrap().handle(
                &parts.method,
                parts.uri.path(),
                parts.uri.query().unwrap_or_default(),
                &ctype,
                &bytes,
            );
            Ok(res)
        })
    }
}

#[test]
fn the_stand_in_patches_as_the_api_server_does() {
    let mut obj =
        json!({"metadata": {"finalizers": ["a", "fillfs.io/populate"], "annotations": {"x": "1"}}});
    json_patch(
        &mut obj,
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": "fillfs.io/populate"},
            {"op": "remove", "path": "/metadata/finalizers/1"},
            {"op": "add", "path": "/metadata/annotations/fillfs.io~1progress", "value": "done"},
        ])
        .as_array()
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        obj,
        json!({"metadata": {"finalizers": ["a"], "annotations": {"x": "1", "fillfs.io/progress": "done"}}})
    );
    let failed = json_patch(
        &mut obj,
        &[json!({"op": "test", "path": "/metadata/finalizers/0", "value": "fillfs.io/populate"})],
    );
    assert!(failed.is_err());
    merge(
        &mut obj,
        &json!({"metadata": {"annotations": {"x": null, "y": "2"}}}),
    );
    assert_eq!(
        obj["metadata"]["annotations"],
        json!({"fillfs.io/progress": "done", "y": "2"})
    );
}

// ---------------------------------------------------------------------------------------
// The rest of the cluster, in virtual time.

/// How the populator watch turns a populator change into triggers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PopulatorWatch {
    /// As `controller::run` wires it: `predicate_filter(predicates::generation)`.
    Generation,
    /// Before the fix: every change (status writes too) wakes the claims naming it.
    EveryChange,
}

/// What the provisioner, scheduler, kubelet and PV controller do, and when.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Cluster {
    /// The user (Argo) creates claim i.
    CreateClaim(usize),
    /// The provisioner makes a PV for PVC' and binds them (Immediate binding).
    BindPrime(String),
    /// The scheduler puts the fill pod on the node.
    SchedulePod(String),
    /// The kubelet starts it.
    RunPod(String),
    /// It exits 0.
    SucceedPod(String),
    /// The PV controller binds the user's claim to the PV whose claimRef now names it.
    BindClaim(String),
}

struct Writers {
    claims: Writer<PersistentVolumeClaim>,
    pods: Writer<Pod>,
    classes: Writer<StorageClass>,
    csinodes: Writer<CSINode>,
    populators: Writer<OSSVolumePopulator>,
}

fn event<K: Clone>(obj: K, deleted: bool) -> watcher::Event<K> {
    if deleted {
        watcher::Event::Delete(obj)
    } else {
        watcher::Event::Apply(obj)
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
struct Run {
    n: usize,
    counts: BTreeMap<String, u64>,
    reconciles: u64,
    wall: Duration,
    /// The populator's final `status.succeeded` and `status.inFlight`.
    succeeded: u64,
    in_flight: u64,
    /// Halfway through the last claim's fill: (fill pods running, `status.inFlight`).
    mid_fill: (u64, u64),
}

impl Run {
    fn total(&self) -> u64 {
        self.counts.values().sum()
    }
    fn get(&self, label: &str) -> u64 {
        self.counts.get(label).copied().unwrap_or(0)
    }
    fn per_claim(&self, label: &str) -> f64 {
        self.get(label) as f64 / self.n as f64
    }
}

struct Sim {
    state: Arc<Mutex<State>>,
    ctx: Arc<Context>,
    writers: Writers,
    watch: PopulatorWatch,
    /// `predicate_filter`'s memory: the last generation hash passed per populator.
    generations: HashMap<String, u64>,
    /// Cluster actions by (time, order).
    agenda: BinaryHeap<Reverse<(u64, u64, Cluster)>>,
    order: u64,
    /// One schedule entry per claim ("ns/name"): when it is next reconciled.
    due: HashMap<String, u64>,
    /// Objects the cluster side has already reacted to.
    seen: HashSet<String>,
    reconciles: u64,
    errors: Vec<String>,
    mode: Mode,
    /// Tokio's clock at virtual time 0: [`Sim::follow`] keeps tokio's (paused) clock at
    /// `epoch + now`, so what the controller times with it (`Memo::log_read_due`) sees
    /// the virtual time pass.
    epoch: tokio::time::Instant,
    /// When to compare `inFlight` with the pods, and what it showed then.
    sample_at: u64,
    mid_fill: Option<(u64, u64)>,
}

/// How claims arrive and how the controller gets to them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Claims [`GAP_MS`] apart; reconciles one at a time, each seeing what the ones before
    /// it wrote (the watch delivers before the next reconcile runs).
    Staggered,
    /// All claims at once, so every step of every fill happens at the same instant; the
    /// claims due at an instant are reconciled concurrently (kube-runtime's default is no
    /// concurrency limit) from the stores as they were when the round began, and the
    /// stores see the round's writes only after it (a watch lagging one round).
    Burst,
}

impl Sim {
    async fn new(populator: Value, watch: PopulatorWatch) -> Sim {
        Sim::with_mode(populator, watch, Mode::Staggered).await
    }

    async fn with_mode(populator: Value, watch: PopulatorWatch, mode: Mode) -> Sim {
        let state = Arc::new(Mutex::new(State::default()));
        let client = kube::Client::new(FakeApi(state.clone()), "default");
        let (claims, claims_w) = reflector::store();
        let (pods, pods_w) = reflector::store();
        let (classes, classes_w) = reflector::store();
        let (csinodes, csinodes_w) = reflector::store();
        let (populators, populators_w) = reflector::store();
        let ctx = Arc::new(Context {
            events: Events::new(client.clone(), "fillfs-controller-0"),
            client,
            settings: settings(),
            metrics: Arc::new(Metrics::default()),
            stores: Stores {
                claims,
                pods,
                classes,
                csinodes,
                populators,
            },
            // One per controller: it outlives reconciles, as in `controller::run`.
            memo: Default::default(),
            max_attempts: 3,
            retry_base: Duration::from_secs(10),
            poll: POLL,
        });
        let mut sim = Sim {
            state,
            ctx,
            writers: Writers {
                claims: claims_w,
                pods: pods_w,
                classes: classes_w,
                csinodes: csinodes_w,
                populators: populators_w,
            },
            watch,
            generations: HashMap::new(),
            agenda: BinaryHeap::new(),
            order: 0,
            due: HashMap::new(),
            seen: HashSet::new(),
            reconciles: 0,
            errors: Vec::new(),
            mode,
            epoch: tokio::time::Instant::now(),
            sample_at: u64::MAX,
            mid_fill: None,
        };
        // What exists before the first claim: the populator, an Immediate StorageClass,
        // and a node with the fillfs node plugin.
        {
            let mut s = sim.state.lock().unwrap();
            s.create(&Route::parse(&cr_path(POPULATOR)), populator)
                .unwrap();
            s.create(
                &Route::parse(&format!("/apis/storage.k8s.io/v1/storageclasses/{CLASS}")),
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                       "metadata": {"name": CLASS}, "provisioner": "diskplugin.csi.alibabacloud.com",
                       "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete"}),
            )
            .unwrap();
            s.create(
                &Route::parse(&format!("/apis/storage.k8s.io/v1/csinodes/{NODE}")),
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                       "metadata": {"name": NODE},
                       "spec": {"drivers": [{"name": DRIVER, "nodeID": NODE}]}}),
            )
            .unwrap();
        }
        let triggers = sim.sync(0);
        assert!(triggers.is_empty(), "{triggers:?}");
        sim
    }

    fn at(&mut self, t: u64, what: Cluster) {
        self.order += 1;
        self.agenda.push(Reverse((t, self.order, what)));
    }

    /// Delivers the stand-in's changes to the stores (the watches), reacts to them on the
    /// cluster's side, and returns the claims ("ns/name") the changes trigger.
    fn sync(&mut self, now: u64) -> Vec<String> {
        let changes = std::mem::take(&mut self.state.lock().unwrap().changes);
        let mut triggers = Vec::new();
        for change in changes {
            let (key, obj, deleted) = match change {
                Change::Applied(key) => {
                    let Some(obj) = self.state.lock().unwrap().objects.get(&key).cloned() else {
                        continue; // deleted since; its Deleted change follows
                    };
                    (key, obj, false)
                }
                Change::Deleted(key, obj) => (key, obj, true),
            };
            let route = Route::parse(&key);
            let name = route.name.clone().unwrap();
            let ns = route.namespace.clone().unwrap_or_default();
            match route.resource.as_str() {
                "persistentvolumeclaims" => {
                    let pvc: PersistentVolumeClaim = serde_json::from_value(obj.clone()).unwrap();
                    self.writers
                        .claims
                        .apply_watcher_event(&event(pvc, deleted));
                    triggers.push(format!("{ns}/{name}"));
                    if ns == OURS && !deleted && self.seen.insert(key.clone()) {
                        self.at(now + 500, Cluster::BindPrime(key));
                    }
                }
                "pods" => {
                    let pod: Pod = serde_json::from_value(obj.clone()).unwrap();
                    let owner = objects::owner_of(&pod.metadata);
                    let ours = pod
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(objects::LABEL_MANAGED_BY))
                        == Some(&"fillfs".to_string());
                    if ns == OURS && ours {
                        self.writers.pods.apply_watcher_event(&event(pod, deleted));
                        if let Some((ons, oname)) = owner {
                            triggers.push(format!("{ons}/{oname}"));
                        }
                    }
                    if !deleted && self.seen.insert(key.clone()) {
                        self.at(now + 300, Cluster::SchedulePod(key.clone()));
                        self.at(now + 1500, Cluster::RunPod(key.clone()));
                        self.at(now + 1500 + FILL_MS, Cluster::SucceedPod(key));
                    }
                }
                "ossvolumepopulators" => {
                    let cr: OSSVolumePopulator = serde_json::from_value(obj).unwrap();
                    self.writers
                        .populators
                        .apply_watcher_event(&event(cr.clone(), deleted));
                    if deleted {
                        continue; // `applied_objects()`: deletions wake nothing
                    }
                    let passes = match self.watch {
                        PopulatorWatch::EveryChange => true,
                        PopulatorWatch::Generation => match predicates::generation(&cr) {
                            None => true,
                            Some(h) => self.generations.insert(key.clone(), h) != Some(h),
                        },
                    };
                    if passes {
                        // The mapper in `controller::run`: the claims naming it.
                        for pvc in self.ctx.stores.claims.state() {
                            if populator_ref(&pvc) == Some((ns.clone(), name.clone())) {
                                triggers.push(format!(
                                    "{}/{}",
                                    pvc.metadata.namespace.as_deref().unwrap(),
                                    pvc.metadata.name.as_deref().unwrap()
                                ));
                            }
                        }
                    }
                }
                "storageclasses" => {
                    let sc: StorageClass = serde_json::from_value(obj).unwrap();
                    self.writers
                        .classes
                        .apply_watcher_event(&event(sc, deleted));
                }
                "csinodes" => {
                    let n: CSINode = serde_json::from_value(obj).unwrap();
                    self.writers
                        .csinodes
                        .apply_watcher_event(&event(n, deleted));
                }
                "persistentvolumes" => {
                    // Not watched by the controller; the PV controller reacts to a claimRef
                    // that names a user's claim (the controller's rebind).
                    let to = obj["spec"]["claimRef"]["namespace"]
                        .as_str()
                        .unwrap_or_default();
                    if !deleted && to != OURS && self.seen.insert(format!("{key}#handed-over")) {
                        self.at(now + 200, Cluster::BindClaim(key));
                    }
                }
                "events" | "secrets" => {}
                other => panic!("unexpected change of {other}"),
            }
        }
        triggers
    }

    fn trigger(&mut self, claims: Vec<String>, now: u64) {
        for c in claims {
            let e = self.due.entry(c).or_insert(now);
            *e = (*e).min(now);
        }
    }

    fn act(&mut self, what: Cluster, now: u64) {
        let mut s = self.state.lock().unwrap();
        s.now = now;
        match what {
            Cluster::CreateClaim(i) => {
                s.create(
                    &Route::parse(&claim_path(NS, &claim_name(i))),
                    user_claim(i),
                )
                .unwrap();
            }
            Cluster::BindPrime(key) => {
                let Some(prime) = s.objects.get(&key).cloned() else {
                    return;
                };
                let pv_name = format!("pv-{}", prime["metadata"]["uid"].as_str().unwrap());
                s.create(
                    &Route::parse(&format!("/api/v1/persistentvolumes/{pv_name}")),
                    json!({"apiVersion": "v1", "kind": "PersistentVolume",
                        "metadata": {"name": pv_name},
                        "spec": {
                            "capacity": {"storage": "20Gi"}, "accessModes": ["ReadWriteOnce"],
                            "storageClassName": CLASS, "persistentVolumeReclaimPolicy": "Delete",
                            "csi": {"driver": "diskplugin.csi.alibabacloud.com", "volumeHandle": pv_name},
                            "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                "namespace": OURS, "name": prime["metadata"]["name"],
                                "uid": prime["metadata"]["uid"]}
                        }}),
                )
                .unwrap();
                s.write(&format!("/api/v1/persistentvolumes/{pv_name}"), |pv| {
                    pv["status"] = json!({"phase": "Bound"})
                });
                s.write(&key, |p| {
                    p["spec"]["volumeName"] = json!(pv_name);
                    p["status"] = json!({"phase": "Bound", "capacity": {"storage": "20Gi"}});
                });
            }
            Cluster::SchedulePod(key) => {
                if !s.objects.contains_key(&key) {
                    return;
                }
                s.write(&key, |p| {
                    p["spec"]["nodeName"] = json!(NODE);
                    p["status"] = json!({"phase": "Pending", "conditions": [
                        {"type": "PodScheduled", "status": "True"}]});
                });
            }
            Cluster::RunPod(key) => {
                if !s.objects.contains_key(&key) {
                    return;
                }
                let name = Route::parse(&key).name.unwrap();
                s.running_since.insert(name, now);
                s.write(&key, |p| {
                    p["status"] = json!({"phase": "Running", "startTime": "2026-11-23T10:00:00Z",
                        "containerStatuses": [{"name": "populate", "ready": true, "restartCount": 0,
                            "image": "x", "imageID": "", "state": {"running": {"startedAt": "2026-11-23T10:00:01Z"}}}]});
                });
            }
            Cluster::SucceedPod(key) => {
                if !s.objects.contains_key(&key) {
                    return;
                }
                let name = Route::parse(&key).name.unwrap();
                s.succeeded.insert(name);
                s.write(&key, |p| {
                    p["status"] = json!({"phase": "Succeeded",
                        "containerStatuses": [{"name": "populate", "ready": false, "restartCount": 0,
                            "image": "x", "imageID": "", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]});
                });
            }
            Cluster::BindClaim(pv_key) => {
                let pv = s.objects[&pv_key].clone();
                let r = &pv["spec"]["claimRef"];
                let claim = claim_path(
                    r["namespace"].as_str().unwrap(),
                    r["name"].as_str().unwrap(),
                );
                let pv_name = pv["metadata"]["name"].clone();
                assert_eq!(
                    s.objects[&claim]["metadata"]["uid"], r["uid"],
                    "claimRef uid"
                );
                s.write(&claim, |c| {
                    c["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"] = json!("yes");
                    c["spec"]["volumeName"] = pv_name;
                    c["status"] = json!({"phase": "Bound", "capacity": {"storage": "20Gi"}});
                });
                // PVC' lost its volume.
                let prime = s
                    .objects
                    .iter()
                    .find(|(k, v)| {
                        k.contains(&format!("/namespaces/{OURS}/persistentvolumeclaims/"))
                            && v["spec"]["volumeName"] == pv["metadata"]["name"]
                    })
                    .map(|(k, _)| k.clone());
                if let Some(p) = prime {
                    s.write(&p, |p| p["status"]["phase"] = json!("Lost"));
                }
            }
        }
    }

    /// The next schedule entry of `key` after its reconcile ended with `result`.
    fn reconciled(&mut self, key: String, result: Result<Action, ReconcileError>, now: u64) {
        let after = match result {
            Ok(a) if a == Action::await_change() => None,
            Ok(a) => Some(
                [
                    POLL,
                    Duration::from_secs(2),
                    Duration::from_secs(5),
                    Duration::from_secs(30),
                ]
                .into_iter()
                .find(|d| a == Action::requeue(*d))
                .unwrap_or_else(|| panic!("unexpected {a:?}")),
            ),
            Err(e) => {
                self.errors.push(format!("{key}: {e}"));
                Some(Duration::from_secs(15))
            }
        };
        if let Some(d) = after {
            let t = now + d.as_millis() as u64;
            let e = self.due.entry(key).or_insert(t);
            *e = (*e).min(t);
        }
    }

    /// The claim as the runner hands it to `reconcile`: from the store (gone: nothing to do).
    fn claim_in_store(&self, key: &str) -> Option<Arc<PersistentVolumeClaim>> {
        let (ns, name) = key.split_once('/').unwrap();
        self.ctx.stores.claims.get(&ObjectRef::new(name).within(ns))
    }

    /// Moves tokio's clock (paused: the tests run with `start_paused`) to virtual time `now`.
    async fn follow(&self, now: u64) {
        let target = self.epoch + Duration::from_millis(now);
        let behind = target.saturating_duration_since(tokio::time::Instant::now());
        if !behind.is_zero() {
            tokio::time::advance(behind).await;
        }
        assert_eq!(
            tokio::time::Instant::now(),
            target,
            "tokio's clock ran ahead of the virtual one (something slept)"
        );
    }

    /// One reconcile of the claim "ns/name", as the controller's runner does it: the object
    /// from the store, then the next schedule entry from the action.
    async fn reconcile_one(&mut self, key: String, now: u64) {
        let Some(pvc) = self.claim_in_store(&key) else {
            return;
        };
        self.reconciles += 1;
        self.follow(now).await;
        let result = reconcile(pvc, self.ctx.clone()).await;
        // The watch delivers what this reconcile wrote before the next one runs.
        let triggers = self.sync(now);
        self.trigger(triggers, now);
        self.reconciled(key, result, now);
    }

    /// Every claim due now, reconciled concurrently from the stores as they are; the
    /// stores see the writes when all are done.
    async fn reconcile_round(&mut self, keys: Vec<String>, now: u64) {
        let work: Vec<(String, Arc<PersistentVolumeClaim>)> = keys
            .into_iter()
            .filter_map(|k| self.claim_in_store(&k).map(|p| (k, p)))
            .collect();
        self.reconciles += work.len() as u64;
        self.follow(now).await;
        let results = futures::future::join_all(
            work.iter()
                .map(|(_, pvc)| reconcile(pvc.clone(), self.ctx.clone())),
        )
        .await;
        let triggers = self.sync(now);
        self.trigger(triggers, now);
        for ((key, _), result) in work.into_iter().zip(results) {
            self.reconciled(key, result, now);
        }
    }

    /// (fill pods running, the populator's `inFlight`).
    fn in_flight_now(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap();
        let running = s
            .objects
            .iter()
            .filter(|(k, v)| {
                k.contains(&format!("/namespaces/{OURS}/pods/"))
                    && !matches!(v["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
            })
            .count() as u64;
        let shown = s.objects[&cr_path(POPULATOR)]["status"]["inFlight"]
            .as_u64()
            .unwrap_or(0);
        (running, shown)
    }

    async fn run(mut self, n: usize) -> Run {
        let started = Instant::now();
        for i in 0..n {
            let t = match self.mode {
                Mode::Staggered => i as u64 * GAP_MS,
                Mode::Burst => 0,
            };
            self.at(t, Cluster::CreateClaim(i));
            self.sample_at = t + 1500 + FILL_MS / 2;
        }
        loop {
            let next_action = self.agenda.peek().map(|Reverse((t, _, _))| *t);
            let next_due = self.due.values().min().copied();
            let Some(now) = [next_action, next_due].into_iter().flatten().min() else {
                break;
            };
            assert!(
                now < 3_600_000,
                "the fills do not end (virtual hour passed)"
            );
            if now >= self.sample_at && self.mid_fill.is_none() {
                self.mid_fill = Some(self.in_flight_now());
            }
            self.state.lock().unwrap().now = now;
            while let Some(Reverse((t, _, _))) = self.agenda.peek()
                && *t == now
            {
                let Reverse((_, _, what)) = self.agenda.pop().unwrap();
                self.act(what, now);
                let triggers = self.sync(now);
                self.trigger(triggers, now);
            }
            match self.mode {
                Mode::Staggered => {
                    while let Some(key) = self
                        .due
                        .iter()
                        .filter(|(_, t)| **t <= now)
                        .min_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
                        .map(|(k, _)| k.clone())
                    {
                        self.due.remove(&key);
                        self.reconcile_one(key, now).await;
                    }
                }
                Mode::Burst => loop {
                    let mut keys: Vec<String> = self
                        .due
                        .iter()
                        .filter(|(_, t)| **t <= now)
                        .map(|(k, _)| k.clone())
                        .collect();
                    if keys.is_empty() {
                        break;
                    }
                    keys.sort();
                    for k in &keys {
                        self.due.remove(k);
                    }
                    self.reconcile_round(keys, now).await;
                },
            }
        }
        assert!(
            self.errors.is_empty(),
            "reconcile errors: {:#?}",
            self.errors
        );
        self.check_done(n);
        let s = self.state.lock().unwrap();
        let status = &s.objects[&cr_path(POPULATOR)]["status"];
        Run {
            n,
            counts: s.counts.clone(),
            reconciles: self.reconciles,
            wall: started.elapsed(),
            succeeded: status["succeeded"].as_u64().unwrap_or(0),
            in_flight: status["inFlight"].as_u64().unwrap_or(0),
            mid_fill: self.mid_fill.expect("sampled"),
        }
    }

    /// Every claim filled, bound and released; nothing of ours left; one FillStarted and
    /// one Populated event each. (The populator's counts are the caller's to check.)
    fn check_done(&self, n: usize) {
        let s = self.state.lock().unwrap();
        for i in 0..n {
            let c = &s.objects[&claim_path(NS, &claim_name(i))];
            assert!(
                c["spec"]["volumeName"].is_string(),
                "claim {i} unbound: {c}"
            );
            assert_eq!(
                c["metadata"]["annotations"]["fillfs.io/progress"], "done",
                "claim {i}"
            );
            assert!(
                c["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(Vec::is_empty),
                "claim {i} kept its finalizer: {c}"
            );
        }
        let leftovers: Vec<_> = s
            .objects
            .keys()
            .filter(|k| k.contains(&format!("/namespaces/{OURS}/")))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        for reason in ["FillStarted", "Populated"] {
            assert_eq!(
                s.events.iter().filter(|(r, _)| r == reason).count(),
                n,
                "{reason} events"
            );
        }
        assert_eq!(
            s.count("POST events"),
            2 * n as u64,
            "only FillStarted and Populated"
        );
    }
}

async fn measure(populator: Value, watch: PopulatorWatch, n: usize) -> Run {
    let run = Sim::new(populator, watch).await.run(n).await;
    assert_eq!(
        (run.succeeded, run.in_flight),
        (n as u64, 0),
        "populator status at the end"
    );
    assert_eq!(run.mid_fill, (n as u64, n as u64), "inFlight mid-fill");
    run
}

fn table(title: &str, small: &Run, large: &Run) -> String {
    let mut kinds: Vec<&String> = small.counts.keys().chain(large.counts.keys()).collect();
    kinds.sort();
    kinds.dedup();
    let mut out = format!(
        "{title}\n| request | total N={} | per claim | total N={} | per claim |\n|---|---:|---:|---:|---:|\n",
        small.n, large.n
    );
    for k in kinds {
        out += &format!(
            "| {k} | {} | {:.3} | {} | {:.3} |\n",
            small.get(k),
            small.per_claim(k),
            large.get(k),
            large.per_claim(k)
        );
    }
    out += &format!(
        "| **all requests** | {} | {:.3} | {} | {:.3} |\n| (reconciles) | {} | {:.3} | {} | {:.3} |\n",
        small.total(),
        small.total() as f64 / small.n as f64,
        large.total(),
        large.total() as f64 / large.n as f64,
        small.reconciles,
        small.reconciles as f64 / small.n as f64,
        large.reconciles,
        large.reconciles as f64 / large.n as f64,
    );
    out
}

const IN_FLIGHT: &str = "PATCH ossvolumepopulators/status (inFlight)";
/// `inFlight` writes at most this many times more than once per claim (see [`assert_linear`]).
const IN_FLIGHT_EDGE: u64 = 2;

/// Linear: each kind's cost is `a·N + b` with the same whole `a` at both sizes and a
/// one-time `b` of at most one request (the populator's `Valid` condition, written once
/// for all claims); so requests per claim agree within 1/20 − 1/200, and N=200 costs no
/// more than 10 × N=20.
///
/// One exception, `inFlight`: its `b` may differ between the sizes, up to [`IN_FLIGHT_EDGE`].
/// A running fill's poll recounts it, and a poll that lands between a pod's exit and its
/// claim's finish (the 200 ms the rebind takes) writes the lower count at once. From the
/// first finish on, every `count_finished` writes the recount too, so only the polls before
/// it write: with 10 s polls and 100 ms gaps, claims 100 and 101 poll exactly when pods 0
/// and 1 exit, so N=200 has 2 such writes and N=20 none. A constant, not a growth.
fn assert_linear(small: &Run, large: &Run) {
    let dn = (large.n - small.n) as u64;
    for k in small.counts.keys().chain(large.counts.keys()) {
        let (s, l) = (small.get(k), large.get(k));
        if k == IN_FLIGHT {
            let a = l / large.n as u64;
            let (bs, bl) = (s as i64 - (a * small.n as u64) as i64, l % large.n as u64);
            assert!(
                (0..=IN_FLIGHT_EDGE as i64).contains(&bs) && bl <= IN_FLIGHT_EDGE,
                "{k}: {s} at N={} and {l} at N={}: not {a} per claim plus at most {IN_FLIGHT_EDGE}",
                small.n,
                large.n
            );
        } else {
            assert!(
                l >= s && (l - s) % dn == 0,
                "{k}: {s} at N={} but {l} at N={}: not a whole number of requests per claim more",
                small.n,
                large.n
            );
            let a = (l - s) / dn;
            let b = s as i64 - (a * small.n as u64) as i64;
            assert!(
                (0..=1).contains(&b),
                "{k}: {a} per claim plus {b} once (only one one-time request is expected)"
            );
        }
        assert!(
            (small.per_claim(k) - large.per_claim(k)).abs() <= 0.05,
            "{k}: {:.3} per claim at N={}, {:.3} at N={}",
            small.per_claim(k),
            small.n,
            large.per_claim(k),
            large.n
        );
    }
    let per_claim_small = small.total() as f64 / small.n as f64;
    assert!(
        large.total() as f64 <= large.n as f64 * per_claim_small,
        "N={}: {} requests, more than {} × {per_claim_small:.3} (per claim at N={})",
        large.n,
        large.total(),
        large.n,
        small.n
    );
}

#[tokio::test(start_paused = true)]
async fn api_requests_are_linear_in_claims_on_the_node_path() {
    let started = Instant::now();
    let small = measure(seed_cr_on_nodes(), PopulatorWatch::Generation, 20).await;
    let large = measure(seed_cr_on_nodes(), PopulatorWatch::Generation, 200).await;
    println!(
        "{}",
        table(
            "Node path (seed populator without its ACS labels; CSINode shows the plugin):",
            &small,
            &large
        )
    );
    println!(
        "wall: N=20 {:?}, N=200 {:?}; mid-fill (pods running, inFlight): {:?} (N=20), {:?} (N=200)",
        small.wall, large.wall, small.mid_fill, large.mid_fill
    );
    assert_linear(&small, &large);
    // What one fill costs, pinned: a change here is a change of the controller's API load.
    // (per claim, once for all claims)
    let cost: BTreeMap<&str, (u64, u64)> = large
        .counts
        .iter()
        .map(|(k, v)| (k.as_str(), (v / large.n as u64, v % large.n as u64)))
        .collect();
    assert_eq!(
        cost,
        BTreeMap::from([
            // finish: cleanup (no secret: the seed uses RRSA, nothing was copied)
            ("DELETE persistentvolumeclaims (PVC')", (1, 0)),
            ("DELETE pods", (1, 0)),
            // rebind
            ("GET persistentvolumes", (1, 0)),
            ("PATCH persistentvolumes", (1, 0)),
            // at 0%, 25%, 50%, 75% (the reconcile a progress patch wakes reads nothing:
            // read < poll/2 ago); 1 in finish (bytes for the metrics)
            ("GET pods/log", (4 + 1, 0)),
            ("PATCH ossvolumepopulators/status (Valid)", (0, 1)),
            // the start; + the 2 polls that see pods 0 and 1 exit before any finish
            // counted (`assert_linear`)
            (IN_FLIGHT, (1, IN_FLIGHT_EDGE)),
            ("PATCH ossvolumepopulators/status (count)", (1, 0)),
            // the finalizer, 3 progress annotations (25%, 50%, 75%; no "0.0%")
            ("PATCH persistentvolumeclaims (claim)", (1 + 3, 0)),
            // finish: finalizer out, "done" in
            ("PATCH persistentvolumeclaims (claim) (JSON patch)", (1, 0)),
            // FillStarted, Populated
            ("POST events", (2, 0)),
            ("POST persistentvolumeclaims (PVC')", (1, 0)),
            ("POST pods", (1, 0)),
        ]),
        "requests (per claim, once) at N={}",
        large.n
    );
    // 20 per claim, the Valid write once, and at N=200 the 2 edge `inFlight` writes.
    assert_eq!(
        (small.total(), large.total()),
        (20 * 20 + 1, 20 * 200 + 1 + IN_FLIGHT_EDGE),
        "all requests at N=20 and N=200"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn api_requests_are_linear_in_claims_on_the_direct_path() {
    // The seed populator unchanged: its ACS labels put fills on virtual nodes (direct path).
    let small = measure(seed_cr(), PopulatorWatch::Generation, 20).await;
    let large = measure(seed_cr(), PopulatorWatch::Generation, 200).await;
    println!(
        "{}",
        table(
            "Direct path (the seed populator unchanged):",
            &small,
            &large
        )
    );
    assert_linear(&small, &large);
    // As on the node path: the path changes the pod, not the requests.
    assert_eq!(
        (small.total(), large.total()),
        (20 * 20 + 1, 20 * 200 + 1 + IN_FLIGHT_EDGE),
        "all requests at N=20 and N=200"
    );
}

/// The harness sees the issue: with the populator watch passing status writes, each of
/// the ~2N status writes wakes every claim in flight: reconciles per claim grow with N
/// (quadratic in all). Before the log-read memo each of those wakes polled the fill (a log
/// read, often a progress patch that woke it once more), so requests grew as fast; now a
/// woken claim reads the log only if its last read is `poll / 2` old and writes `inFlight`
/// only when the count moved, so requests barely grow (printed, not asserted): the wakes
/// still cost the controller a reconcile each, and the predicate is what keeps them off.
#[tokio::test(start_paused = true)]
async fn every_status_write_wakes_every_claim() {
    let small = measure(seed_cr_on_nodes(), PopulatorWatch::EveryChange, 20).await;
    let large = measure(seed_cr_on_nodes(), PopulatorWatch::EveryChange, 100).await;
    println!(
        "{}",
        table(
            "Counterfactual: populator watch without the generation predicate:",
            &small,
            &large
        )
    );
    let (s, l) = (
        small.reconciles as f64 / small.n as f64,
        large.reconciles as f64 / large.n as f64,
    );
    assert!(
        l > 2.5 * s,
        "reconciles per claim {s:.1} at N={} and {l:.1} at N={}: expected quadratic growth",
        small.n,
        large.n
    );
}

/// The generation predicate lets a spec change through and drops a status-only write.
#[test]
fn the_generation_predicate_ignores_status_writes() {
    let mut cr: OSSVolumePopulator = serde_json::from_value(seed_cr()).unwrap();
    cr.metadata.generation = Some(1);
    cr.metadata.resource_version = Some("10".into());
    let before = predicates::generation(&cr);
    assert!(before.is_some());

    let mut status_only = cr.clone();
    status_only.metadata.resource_version = Some("11".into());
    status_only.status =
        Some(serde_json::from_value(json!({"inFlight": 7, "succeeded": 3, "failed": 1})).unwrap());
    assert_eq!(predicates::generation(&status_only), before);

    let mut spec_change = status_only.clone();
    spec_change.metadata.resource_version = Some("12".into());
    spec_change.metadata.generation = Some(2);
    spec_change.spec.path = "/other-files/".into();
    assert_ne!(predicates::generation(&spec_change), before);
}

async fn burst(n: usize) -> Run {
    Sim::with_mode(seed_cr_on_nodes(), PopulatorWatch::Generation, Mode::Burst)
        .await
        .run(n)
        .await
}

/// All claims at once, reconciled concurrently from stores one round behind. Requests stay
/// linear. The populator's shared status costs less than in the staggered run where it is
/// written once for all claims (`Valid`, and `inFlight`: 1 at the start, then the recount
/// once the pods show), and more at the finishes: they are serialized, but every finish
/// after the first holds a populator copy from the store, a round behind the write before
/// it, so it conflicts once and reads the populator again (never more than once).
#[tokio::test(start_paused = true)]
async fn a_burst_of_claims_costs_linear_requests() {
    let small = burst(20).await;
    let large = burst(200).await;
    for run in [&small, &large] {
        println!(
            "burst N={}: at the end succeeded {} inFlight {}; mid-fill {} pods running, inFlight {}; {:?}",
            run.n, run.succeeded, run.in_flight, run.mid_fill.0, run.mid_fill.1, run.wall
        );
    }
    println!(
        "{}",
        table(
            "Burst (all claims at once, concurrent reconciles, stores one round behind):",
            &small,
            &large
        )
    );
    for run in [&small, &large] {
        let n = run.n as u64;
        for (k, expected) in [
            ("PATCH ossvolumepopulators/status (count)", 2 * n - 1),
            ("GET ossvolumepopulators", n - 1),
            ("PATCH ossvolumepopulators/status (Valid)", 1),
            (IN_FLIGHT, 2),
        ] {
            assert_eq!(run.get(k), expected, "{k} at N={n}");
        }
    }
    let shared = [
        "GET ossvolumepopulators",
        "PATCH ossvolumepopulators/status (count)",
        "PATCH ossvolumepopulators/status (Valid)",
        IN_FLIGHT,
    ];
    for k in small.counts.keys().chain(large.counts.keys()) {
        if !shared.contains(&k.as_str()) {
            assert_eq!(
                small.per_claim(k),
                large.per_claim(k),
                "{k} per claim at N=20 and N=200"
            );
        }
    }
    let (s, l) = (
        small.total() as f64 / small.n as f64,
        large.total() as f64 / large.n as f64,
    );
    assert!(
        l <= s * 1.05,
        "{s:.2} requests per claim at N=20, {l:.2} at N=200"
    );
}

/// What the burst's populator status says. Until 7377047 it was wrong: `count_finished`
/// gave up after 5 conflicts, so of N fills that ended together about 5 per retry wave
/// were counted (5 of 20, 30 of 200) and the rest lost with a warning; and each start wrote
/// `inFlight` recounted from a pod store that did not yet show the other starts of its
/// round, and nothing recounted while fills ran, so `inFlight` showed 1 while 200 pods ran.
/// Now the writes of one populator are serialized in-process (at most one conflict each,
/// from the store's copy being a round behind) and every poll recounts `inFlight`.
#[tokio::test(start_paused = true)]
async fn a_burst_of_claims_is_counted() {
    for n in [20, 200] {
        let run = burst(n).await;
        let n = n as u64;
        assert_eq!(run.succeeded, n, "status.succeeded after {n} fills");
        assert_eq!(run.in_flight, 0, "status.inFlight after {n} fills");
        assert_eq!(
            run.mid_fill,
            (n, n),
            "(pods running, status.inFlight) mid-fill"
        );
    }
}
