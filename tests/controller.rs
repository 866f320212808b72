//! The volume populator controller against kube's `tower-test` API-server verifier: each
//! test feeds one reconcile a PVC and answers its API requests from a script, asserting
//! every request (method, path, and the body where it matters) in order. A request the
//! script does not expect, or one it expects that never comes, fails the test.
//!
//! Also: golden files for PVC' and the fill pod, the CRD in deploy/ equal to `fillfs crd`,
//! and the source article's examples deserializing and validating against the schema.

use std::sync::Arc;
use std::time::Duration;

use fillfs::controller::crd::OSSVolumePopulator;
use fillfs::controller::metrics::Metrics;
use fillfs::controller::objects::{self, Settings};
use fillfs::controller::reconcile::{Context, ReconcileError, populator_ref, reconcile};
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use serde_json::{Value, json};

type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const UID: &str = "6f1c2b7e-0000-4000-8000-000000000001";
const NS: &str = "argo";
/// As Argo names an ephemeral claim: `<pod>-<volume>`, longer than a label value may be.
const PVC: &str = "parallel-data-process-with-ossvp-x7k2p-echo-template-3180521436-scratch-volume";
const OURS: &str = "fillfs-system";

fn settings() -> Settings {
    Settings {
        namespace: OURS.into(),
        image: "ghcr.io/fillfs/fillfs:test".into(),
        service_account: "fillfs-populate".into(),
        csi_driver: "csi.fillfs.io".into(),
    }
}

/// The source article's OSSVolumePopulator, as committed in deploy/examples.
fn seed_cr() -> OSSVolumePopulator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/seed-ossvolumepopulator.yaml"
    ))
    .unwrap();
    serde_yaml::from_str(&text).expect("the seed example deserializes")
}

/// The populator as the API returns it: already found valid, unless it says otherwise.
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
        if cur.get(part).is_none() {
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

fn pod(phase: &str, terminated: Option<(i32, &str)>) -> Value {
    let mut p = serde_json::to_value(objects::fill_pod(
        &pvc_from(&user_pvc()),
        &seed_cr(),
        &settings(),
        None,
        None,
    ))
    .unwrap();
    p["metadata"]["creationTimestamp"] = json!("2026-11-23T10:00:00Z");
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

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

enum Reply {
    Json(Value),
    NotFound,
    /// Answer with the request's own body (creates).
    Echo,
    Text(String),
    /// 409: the object changed since the resourceVersion the request carried.
    Conflict,
    /// 422 with this message: the object breaks the API's validation.
    Invalid(&'static str),
}

type Check = Box<dyn FnOnce(&Value) + Send>;

struct Expect {
    method: Method,
    path: String,
    query: Option<&'static str>,
    reply: Reply,
    check: Option<Check>,
}

fn expect(method: Method, path: impl Into<String>, reply: Reply) -> Expect {
    Expect {
        method,
        path: path.into(),
        query: None,
        reply,
        check: None,
    }
}

impl Expect {
    fn check(mut self, f: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }
    fn query(mut self, q: &'static str) -> Self {
        self.query = Some(q);
        self
    }
}

const CR_PATH: &str =
    "/apis/storage.alibabacloud.com/v1beta1/namespaces/argo/ossvolumepopulators/generic-demo";
const SC_PATH: &str = "/apis/storage.k8s.io/v1/storageclasses/alicloud-disk-essd";
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

fn event_with_reason(reason: &'static str) -> Expect {
    expect(Method::POST, EVENTS, Reply::Echo).check(move |b| {
        assert_eq!(b["reason"], reason, "event: {b}");
        assert_eq!(b["regarding"]["name"], PVC, "event: {b}");
    })
}

/// The one patch that ends a fill: our finalizer out (tested in place), "done" in.
/// A bound claim released: the fill pod looked up, pod, PVC' and secret copy deleted, then
/// the finishing patch of the claim.
fn released_steps(bound: &Value) -> Vec<Expect> {
    vec![
        expect(Method::GET, pod_path(), Reply::NotFound),
        expect(Method::DELETE, pod_path(), Reply::NotFound),
        expect(Method::DELETE, prime_path(), Reply::NotFound),
        expect(Method::DELETE, secret_path(), Reply::NotFound),
        finish_patch(bound),
    ]
}

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

/// Runs one reconcile of `pvc` against the script; returns its action and the metrics.
async fn run(
    pvc: Value,
    script: Vec<Expect>,
    tweak: impl FnOnce(&mut Context),
) -> (Action, Arc<Metrics>) {
    let (result, metrics) = run_result(pvc, script, tweak).await;
    (result.expect("reconcile"), metrics)
}

/// [`run`], for a reconcile that may end in an error.
async fn run_result(
    pvc: Value,
    script: Vec<Expect>,
    tweak: impl FnOnce(&mut Context),
) -> (Result<Action, ReconcileError>, Arc<Metrics>) {
    let (svc, mut handle): (_, ApiHandle) = tower_test::mock::pair();
    let client = kube::Client::new(svc, "default");
    let metrics = Arc::new(Metrics::default());
    let mut ctx = Context {
        recorder: Recorder::new(client.clone(), "fillfs-populator".into()),
        client,
        settings: settings(),
        metrics: metrics.clone(),
        max_attempts: 3,
        retry_base: Duration::from_secs(10),
        poll: Duration::from_secs(10),
    };
    tweak(&mut ctx);
    // Like the API server, the mock moves the user PVC's resourceVersion on every patch
    // and refuses a patch that carries an older one.
    let mut pvc_version: u64 = pvc["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let rec = tokio::spawn(reconcile(Arc::new(pvc_from(&pvc)), Arc::new(ctx)));
    for (i, e) in script.into_iter().enumerate() {
        let Some((req, send)) = handle.next_request().await else {
            panic!(
                "request {i}: expected {} {}, but the reconcile ended ({:?})",
                e.method,
                e.path,
                rec.await.unwrap()
            );
        };
        let (method, uri) = (req.method().clone(), req.uri().clone());
        assert_eq!(
            (&method, uri.path()),
            (&e.method, e.path.as_str()),
            "request {i}: got {method} {uri}"
        );
        if let Some(q) = e.query {
            assert!(
                uri.query().unwrap_or_default().contains(q),
                "request {i}: {uri} lacks {q}"
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
        let (status, out) = match reply {
            Reply::Json(v) => (200, serde_json::to_vec(&v).unwrap()),
            Reply::NotFound => (404, serde_json::to_vec(&not_found()).unwrap()),
            Reply::Echo => (201, bytes.to_vec()),
            Reply::Text(t) => (200, t.into_bytes()),
            Reply::Invalid(m) => (
                422,
                serde_json::to_vec(
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": m, "reason": "Invalid", "code": 422}),
                )
                .unwrap(),
            ),
            Reply::Conflict => (
                409,
                serde_json::to_vec(
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": "the object has been modified",
                    "reason": "Conflict", "code": 409}),
                )
                .unwrap(),
            ),
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(out))
                .unwrap(),
        );
    }
    let mut rec = rec;
    let action = tokio::select! {
        biased;
        r = &mut rec => r.unwrap(),
        extra = handle.next_request() => match extra {
            Some((req, _)) => panic!("unexpected request after the script: {} {}", req.method(), req.uri()),
            // The reconcile ended and dropped its client.
            None => rec.await.unwrap(),
        },
    };
    (action, metrics)
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

fn finalized(v: Value) -> Value {
    with(v, "/metadata/finalizers", json!([objects::FINALIZER]))
}

/// Requests of a first reconcile that starts a fill (PVC' and pod missing).
fn start_fill(selected_node: Option<&'static str>) -> Vec<Expect> {
    vec![
        expect(Method::GET, prime_path(), Reply::NotFound),
        expect(Method::GET, pod_path(), Reply::NotFound),
        expect(
            Method::PATCH,
            user_pvc_path(),
            Reply::Json(finalized(user_pvc())),
        )
        .check(|b| {
            assert_eq!(b["metadata"]["finalizers"], json!(["fillfs.io/populate"]));
            assert_eq!(
                b["metadata"]["resourceVersion"], "100",
                "optimistic concurrency"
            );
        }),
        expect(
            Method::POST,
            format!("/api/v1/namespaces/{OURS}/persistentvolumeclaims"),
            Reply::Echo,
        )
        .check(move |b| {
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
        }),
        expect(
            Method::POST,
            format!("/api/v1/namespaces/{OURS}/pods"),
            Reply::Echo,
        )
        .check(move |b| {
            assert_eq!(b["metadata"]["name"], format!("populate-{UID}"));
            assert_eq!(
                b["metadata"]["annotations"],
                json!({
                    "fillfs.io/pvc-namespace": NS,
                    "fillfs.io/pvc-name": PVC,
                    "fillfs.io/populator": "argo/generic-demo"
                }),
                "the pod watch maps pods back to claims through these"
            );
            assert_eq!(
                b["spec"]["nodeName"],
                selected_node.map_or(Value::Null, |n| json!(n))
            );
            assert_eq!(
                b["metadata"]["labels"]["alibabacloud.com/acs"], "true",
                "generic.labels"
            );
            let args = &b["spec"]["containers"][0]["args"];
            assert_eq!(
                args,
                &json!(["populate", "/source", "/target", "--progress", "json"])
            );
            let src = &b["spec"]["volumes"][0]["csi"];
            assert_eq!(src["driver"], "csi.fillfs.io");
            assert_eq!(
                src["volumeAttributes"]["roleArn"],
                "acs:ram::123456789012:role/oss-populator"
            );
            assert_eq!(
                b["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"],
                format!("prime-{UID}")
            );
        }),
        event_with_reason("FillStarted"),
    ]
}

#[tokio::test]
async fn happy_path_filesystem_from_start_to_rebind() {
    let cr = cr_json(&seed_cr());
    // 1. A new PVC: finalizer, PVC', pod.
    let mut script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr.clone())),
        expect(
            Method::GET,
            SC_PATH,
            Reply::Json(storage_class("Immediate")),
        ),
    ];
    script.extend(start_fill(None));
    let (action, metrics) = run(user_pvc(), script, |_| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    assert!(metrics.render().contains("fillfs_populations_in_flight 1"));

    // 2. Running: progress from the pod's JSON lines onto the PVC.
    let log = "{\"bytes_done\":10,\"bytes_total\":100,\"percent\":41.96,\"done\":false}\n";
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr.clone())),
        expect(
            Method::GET,
            SC_PATH,
            Reply::Json(storage_class("Immediate")),
        ),
        expect(
            Method::GET,
            prime_path(),
            Reply::Json(prime("Bound", Some("d-pv-1"))),
        ),
        expect(Method::GET, pod_path(), Reply::Json(pod("Running", None))),
        expect(
            Method::GET,
            format!("{}/log", pod_path()),
            Reply::Text(log.to_string()),
        )
        .query("container=populate"),
        expect(
            Method::PATCH,
            user_pvc_path(),
            Reply::Json(finalized(user_pvc())),
        )
        .check(|b| assert_eq!(b["metadata"]["annotations"]["fillfs.io/progress"], "42.0%")),
    ];
    let (action, _) = run(finalized(user_pvc()), script, |_| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));

    // 3. Succeeded: the PV is handed to the user's claim.
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr.clone())),
        expect(
            Method::GET,
            SC_PATH,
            Reply::Json(storage_class("Immediate")),
        ),
        expect(
            Method::GET,
            prime_path(),
            Reply::Json(prime("Bound", Some("d-pv-1"))),
        ),
        expect(
            Method::GET,
            pod_path(),
            Reply::Json(pod("Succeeded", Some((0, "")))),
        ),
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
    let (action, _) = run(finalized(user_pvc()), script, |_| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));

    // 4. The PV controller bound the user's PVC: clean up, then "done" and the finalizer
    // in one JSON patch (no resourceVersion to go stale), count it.
    let bound = with(finalized(user_pvc()), "/spec/volumeName", json!("d-pv-1"));
    let summary = "{\"bytes_done\":1048576,\"percent\":100.0,\"elapsed_s\":12.5,\"done\":true}\n";
    let script = vec![
        expect(
            Method::GET,
            pod_path(),
            Reply::Json(pod("Succeeded", Some((0, "")))),
        ),
        expect(
            Method::GET,
            format!("{}/log", pod_path()),
            Reply::Text(summary.to_string()),
        ),
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
        expect(Method::DELETE, secret_path(), Reply::NotFound),
        finish_patch(&bound),
        expect(Method::GET, CR_PATH, Reply::Json(cr.clone())),
        event_with_reason("Populated"),
        expect(
            Method::GET,
            format!("/api/v1/namespaces/{OURS}/pods"),
            Reply::Json(
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
            ),
        )
        .query("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dfillfs"),
        expect(
            Method::PATCH,
            format!("{CR_PATH}/status"),
            Reply::Json(cr.clone()),
        )
        .check(|b| {
            assert_eq!(
                b,
                &json!({"metadata": {"resourceVersion": "5"}, "status": {"succeeded": 1, "inFlight": 0}})
            )
        }),
    ];
    let (action, metrics) = run(bound, script, |_| {}).await;
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
    let mut cr = seed_cr();
    cr.spec.path = "/images/disk.img".into();
    let pvc = with(user_pvc(), "/spec/volumeMode", json!("Block"));
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr_json(&cr))),
        expect(
            Method::GET,
            SC_PATH,
            Reply::Json(storage_class("Immediate")),
        ),
        expect(Method::GET, prime_path(), Reply::NotFound),
        expect(Method::GET, pod_path(), Reply::NotFound),
        expect(
            Method::PATCH,
            user_pvc_path(),
            Reply::Json(finalized(pvc.clone())),
        ),
        expect(
            Method::POST,
            format!("/api/v1/namespaces/{OURS}/persistentvolumeclaims"),
            Reply::Echo,
        )
        .check(|b| assert_eq!(b["spec"]["volumeMode"], "Block")),
        expect(
            Method::POST,
            format!("/api/v1/namespaces/{OURS}/pods"),
            Reply::Echo,
        )
        .check(|b| {
            let c = &b["spec"]["containers"][0];
            assert_eq!(
                c["args"],
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
                c["volumeDevices"],
                json!([{"name": "target", "devicePath": "/dev/target"}])
            );
            assert_eq!(c["securityContext"]["privileged"], false);
            assert_eq!(
                b["spec"]["volumes"][0]["csi"]["volumeAttributes"]["path"],
                "/images"
            );
        }),
        event_with_reason("FillStarted"),
    ];
    let (action, _) = run(pvc, script, |_| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn wait_for_first_consumer_then_fill_on_its_node() {
    let cr = cr_json(&seed_cr());
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr.clone())),
        expect(
            Method::GET,
            SC_PATH,
            Reply::Json(storage_class("WaitForFirstConsumer")),
        ),
    ];
    let (action, _) = run(user_pvc(), script, |_| {}).await;
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
    let mut script = vec![expect(Method::GET, CR_PATH, Reply::Json(cr))];
    script.extend(start_fill(Some("node-7")));
    let (action, _) = run(selected, script, |_| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

fn running_fill_prefix(cr: &Value) -> Vec<Expect> {
    vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr.clone())),
        expect(
            Method::GET,
            SC_PATH,
            Reply::Json(storage_class("Immediate")),
        ),
        expect(
            Method::GET,
            prime_path(),
            Reply::Json(prime("Bound", Some("d-pv-1"))),
        ),
    ]
}

#[tokio::test]
async fn a_failed_fill_is_retried_with_backoff() {
    let cr = cr_json(&seed_cr());
    for (attempts_before, delay) in [(None, 10u64), (Some("1"), 20)] {
        let mut pvc = finalized(user_pvc());
        if let Some(a) = attempts_before {
            pvc = with(
                pvc,
                "/metadata/annotations",
                json!({"fillfs.io/attempts": a}),
            );
        }
        let mut script = running_fill_prefix(&cr);
        let next = attempts_before.map_or(1, |a| a.parse::<u32>().unwrap() + 1);
        let decided = Arc::new(std::sync::Mutex::new(Value::Null));
        let seen = decided.clone();
        script.extend([
            expect(
                Method::GET,
                pod_path(),
                Reply::Json(pod(
                    "Failed",
                    Some((
                        1,
                        "fillfs: error: cannot reach https://oss: connection reset",
                    )),
                )),
            ),
            // The decision is on the PVC before the pod goes (its deletion wakes us).
            expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(move |b| {
                let a = &b["metadata"]["annotations"];
                assert_eq!(a["fillfs.io/attempts"], next.to_string());
                assert_eq!(a["fillfs.io/failed-pod"], "pod-uid-1");
                assert!(a.get("fillfs.io/failed").is_none(), "{a}");
                *seen.lock().unwrap() = a.clone();
            }),
            expect(Method::DELETE, pod_path(), Reply::Json(pod("Failed", None))),
            expect(Method::POST, EVENTS, Reply::Echo).check(move |b| {
                assert_eq!(b["reason"], "FillFailed");
                let note = b["note"].as_str().unwrap();
                assert!(
                    note.contains(&format!("attempt {next} of 3"))
                        && note.contains("connection reset"),
                    "{note}"
                );
            }),
        ]);
        let (action, metrics) = run(pvc.clone(), script, |_| {}).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(delay)));
        assert!(
            metrics
                .render()
                .contains("fillfs_population_retries_total 1")
        );

        // At once, woken by the patch and the deletion: the pod is gone, the backoff is
        // not over, so nothing is created; the wait is what is left of it.
        let annotations = decided.lock().unwrap().clone();
        let after = with(pvc, "/metadata/annotations", annotations.clone());
        let retry_after = annotations["fillfs.io/retry-after"].as_str().unwrap();
        let at = k8s_openapi::chrono::DateTime::parse_from_rfc3339(retry_after).unwrap();
        let ahead = (at.timestamp() - k8s_openapi::chrono::Utc::now().timestamp()) as u64;
        assert!((delay - 2..=delay).contains(&ahead), "{retry_after}");
        let mut script = running_fill_prefix(&cr);
        script.push(expect(Method::GET, pod_path(), Reply::NotFound));
        let (action, _) = run(after.clone(), script, |_| {}).await;
        assert!(
            (delay - 2..=delay).any(|s| action == Action::requeue(Duration::from_secs(s))),
            "{action:?}: the rest of the {delay}s backoff"
        );

        // Once it is over, the next pod starts (PVC' and the finalizer are there already).
        let mut over = after;
        over["metadata"]["annotations"]["fillfs.io/retry-after"] = json!("2026-01-01T00:00:00Z");
        let mut script = running_fill_prefix(&cr);
        script.extend([
            expect(Method::GET, pod_path(), Reply::NotFound),
            expect(
                Method::POST,
                format!("/api/v1/namespaces/{OURS}/pods"),
                Reply::Echo,
            ),
            event_with_reason("FillStarted"),
        ]);
        let (action, _) = run(over, script, |_| {}).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    }
}

#[tokio::test]
async fn permanent_failures_stop_without_a_hot_loop() {
    let cr = cr_json(&seed_cr());
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
            pvc = with(
                pvc,
                "/metadata/annotations",
                json!({"fillfs.io/attempts": a}),
            );
        }
        let attempts = before.map_or(1, |a| a.parse::<u32>().unwrap() + 1);
        let mut script = running_fill_prefix(&cr);
        script.extend([
            expect(
                Method::GET,
                pod_path(),
                Reply::Json(pod("Failed", Some((code, msg)))),
            ),
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
            expect(Method::POST, EVENTS, Reply::Echo).check(move |b| {
                let note = b["note"].as_str().unwrap();
                assert!(note.contains(why) && note.contains("giving up"), "{note}");
                assert!(note.contains(msg), "{note}");
            }),
            expect(
                Method::GET,
                format!("/api/v1/namespaces/{OURS}/pods"),
                Reply::Json(
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
                ),
            ),
            expect(
                Method::PATCH,
                format!("{CR_PATH}/status"),
                Reply::Json(cr.clone()),
            )
            .check(|b| assert_eq!(b["status"], json!({"failed": 1, "inFlight": 0}))),
        ]);
        let (action, metrics) = run(pvc.clone(), script, |_| {}).await;
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
        let mut after = pvc.clone();
        after["metadata"]["annotations"]["fillfs.io/failed"] = json!(msg);
        after["metadata"]["annotations"]["fillfs.io/failed-pod"] = json!("pod-uid-1");
        let mut script = running_fill_prefix(&cr);
        script.push(expect(Method::GET, pod_path(), Reply::NotFound));
        let (action, _) = run(after.clone(), script, |_| {}).await;
        assert_eq!(action, Action::await_change());

        // The pod's deletion did not go through: it is deleted again, not counted again.
        let mut script = running_fill_prefix(&cr);
        script.extend([
            expect(
                Method::GET,
                pod_path(),
                Reply::Json(pod("Failed", Some((code, msg)))),
            ),
            expect(Method::DELETE, pod_path(), Reply::Json(pod("Failed", None))),
        ]);
        let (action, metrics) = run(after, script, |_| {}).await;
        assert_eq!(action, Action::await_change());
        assert!(!metrics.render().contains("result=\"failed\"} 1"));
    }
}

#[tokio::test]
async fn deleting_the_pvc_mid_fill_cleans_up_at_once() {
    let pvc = with(
        with(
            user_pvc(),
            "/metadata/finalizers",
            json!(["kubernetes.io/pvc-protection", objects::FINALIZER]),
        ),
        "/metadata/deletionTimestamp",
        json!("2026-11-23T10:05:00Z"),
    );
    let script = vec![
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
        expect(Method::DELETE, secret_path(), Reply::NotFound),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(pvc.clone())).check(|b| {
            assert_eq!(
                b,
                &json!([
                    {"op": "test", "path": "/metadata/finalizers/1", "value": "fillfs.io/populate"},
                    {"op": "remove", "path": "/metadata/finalizers/1"},
                ])
            )
        }),
    ];
    let (action, _) = run(pvc, script, |_| {}).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_missing_populator_is_waited_for_then_used() {
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::NotFound),
        event_with_reason("PopulatorNotFound"),
    ];
    let (action, _) = run(user_pvc(), script, |_| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    // Created later: the next reconcile starts the fill.
    let mut script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr_json(&seed_cr()))),
        expect(
            Method::GET,
            SC_PATH,
            Reply::Json(storage_class("Immediate")),
        ),
    ];
    script.extend(start_fill(None));
    run(user_pvc(), script, |_| {}).await;
}

#[tokio::test]
async fn an_invalid_spec_never_creates_a_pod() {
    let mut cr = seed_cr();
    cr.spec.bucket = "My_Bucket".into();
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr_json(&cr))),
        expect(Method::POST, EVENTS, Reply::Echo).check(|b| {
            assert_eq!(b["reason"], "InvalidSpec");
            assert!(b["note"].as_str().unwrap().contains("My_Bucket"));
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
    let (action, _) = run(user_pvc(), script, |_| {}).await;
    assert_eq!(action, Action::await_change());

    // Fixed: Valid goes back to True (then the claim waits for its consumer here).
    let mut fixed = cr_json(&seed_cr());
    fixed["status"]["conditions"][0]["status"] = json!("False");
    fixed["status"]["conditions"][0]["message"] = json!("spec.bucket \"My_Bucket\" ...");
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(fixed.clone())),
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
        expect(
            Method::GET,
            SC_PATH,
            Reply::Json(storage_class("WaitForFirstConsumer")),
        ),
    ];
    let (action, _) = run(user_pvc(), script, |_| {}).await;
    assert_eq!(action, Action::await_change());

    // A PVC without a size is refused on that PVC only: the shared populator stays Valid.
    let no_size = with(user_pvc(), "/spec/resources", json!({}));
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr_json(&seed_cr()))),
        expect(Method::POST, EVENTS, Reply::Echo).check(|b| {
            assert_eq!(b["reason"], "InvalidClaim");
            assert!(
                b["note"]
                    .as_str()
                    .unwrap()
                    .contains("requests no storage size")
            );
        }),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(user_pvc())).check(|b| {
            let why = b["metadata"]["annotations"]["fillfs.io/invalid"]
                .as_str()
                .unwrap();
            assert!(why.contains("requests no storage size"), "{why}");
        }),
    ];
    let (action, _) = run(no_size, script, |_| {}).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn block_mode_from_a_prefix_is_refused_before_anything_is_created() {
    let cr = cr_json(&seed_cr()); // path: /many-files/
    let pvc = with(user_pvc(), "/spec/volumeMode", json!("Block"));
    let reason = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = reason.clone();
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr.clone())),
        expect(Method::POST, EVENTS, Reply::Echo).check(|b| {
            assert_eq!(b["reason"], "InvalidClaim");
            let note = b["note"].as_str().unwrap();
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
    let (action, _) = run(pvc.clone(), script, |_| {}).await;
    assert_eq!(action, Action::await_change(), "permanent: not retried");
    // Said once: the reconcile the annotation wakes makes no request but the populator's.
    let reason = reason.lock().unwrap().clone();
    assert!(reason.contains("/images/disk.img"), "{reason}");
    let said = with(
        pvc,
        "/metadata/annotations",
        json!({"fillfs.io/invalid": reason}),
    );
    let script = vec![expect(Method::GET, CR_PATH, Reply::Json(cr))];
    let (action, _) = run(said, script, |_| {}).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn an_access_key_secret_is_copied_next_to_the_pod() {
    let mut cr = seed_cr();
    cr.spec.generic.as_mut().unwrap().rrsa_configs = None;
    cr.spec.credentials_secret_ref = Some(fillfs::controller::crd::SecretRef {
        name: "oss-creds".into(),
    });
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "oss-creds", "namespace": NS},
        "data": {"akId": "TFRBSWlk", "akSecret": "c2VjcmV0", "unrelated": "eA=="}
    });
    let secret_path = format!("/api/v1/namespaces/{NS}/secrets/oss-creds");
    let prefix = |cr: &OSSVolumePopulator, prime_exists: bool| {
        vec![
            expect(Method::GET, CR_PATH, Reply::Json(cr_json(cr))),
            expect(
                Method::GET,
                SC_PATH,
                Reply::Json(storage_class("Immediate")),
            ),
            expect(
                Method::GET,
                prime_path(),
                if prime_exists {
                    Reply::Json(prime("Bound", Some("d-pv-1")))
                } else {
                    Reply::NotFound
                },
            ),
            expect(Method::GET, pod_path(), Reply::NotFound),
        ]
    };
    let mut script = prefix(&cr, true);
    script.extend([
        expect(Method::GET, secret_path.clone(), Reply::Json(secret)),
        expect(
            Method::POST,
            format!("/api/v1/namespaces/{OURS}/secrets"),
            Reply::Echo,
        )
        .check(|b| {
            assert_eq!(b["metadata"]["name"], format!("populate-{UID}"));
            assert_eq!(
                b["data"],
                json!({"akId": "TFRBSWlk", "akSecret": "c2VjcmV0"}),
                "only the key entries"
            );
        }),
        expect(
            Method::POST,
            format!("/api/v1/namespaces/{OURS}/pods"),
            Reply::Echo,
        )
        .check(|b| {
            let csi = &b["spec"]["volumes"][0]["csi"];
            assert_eq!(
                csi["nodePublishSecretRef"]["name"],
                format!("populate-{UID}")
            );
            assert!(csi["volumeAttributes"].get("roleArn").is_none());
        }),
        event_with_reason("FillStarted"),
    ]);
    run(finalized(user_pvc()), script, |_| {}).await;

    // A new claim and a missing Secret: an event, and nothing written (no finalizer, no
    // PVC'); Secrets are not watched, so it looks again in 30 s.
    let mut script = prefix(&cr, false);
    script.extend([
        expect(Method::GET, secret_path.clone(), Reply::NotFound),
        expect(Method::POST, EVENTS, Reply::Echo).check(|b| {
            assert_eq!(b["reason"], "SecretNotFound");
            assert!(b["note"].as_str().unwrap().contains("argo/oss-creds"));
        }),
    ]);
    let (action, _) = run(user_pvc(), script, |_| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));

    // A Secret without akSecret: the same, naming the key and never a value.
    let partial = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "oss-creds", "namespace": NS},
        "data": {"akId": "TFRBSWlk"}
    });
    let mut script = prefix(&cr, false);
    script.extend([
        expect(Method::GET, secret_path, Reply::Json(partial)),
        expect(Method::POST, EVENTS, Reply::Echo).check(|b| {
            assert_eq!(b["reason"], "SecretInvalid");
            let note = b["note"].as_str().unwrap();
            assert!(note.contains("no akSecret"), "{note}");
            assert!(
                !note.contains("TFRBSWlk") && !note.contains("LTAIid"),
                "{note}"
            );
        }),
    ]);
    let (action, _) = run(user_pvc(), script, |_| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_bound_claim_is_only_cleaned_up_never_filled_again() {
    // The finish patch failed once (e.g. a conflict) after the clean-up: the retry finds
    // the claim bound, PVC' and the pod gone. It must not start a new fill.
    let bound = with(finalized(user_pvc()), "/spec/volumeName", json!("d-pv-1"));
    let mut script = released_steps(&bound);
    script.extend([
        expect(Method::GET, CR_PATH, Reply::Json(cr_json(&seed_cr()))),
        event_with_reason("Populated"),
        expect(
            Method::GET,
            format!("/api/v1/namespaces/{OURS}/pods"),
            Reply::Json(
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
            ),
        ),
        expect(
            Method::PATCH,
            format!("{CR_PATH}/status"),
            Reply::Json(cr_json(&seed_cr())),
        ),
    ]);
    let (action, _) = run(bound.clone(), script, |_| {}).await;
    assert_eq!(action, Action::await_change());

    // Its populator deleted meanwhile: still cleaned up and released.
    let mut script = released_steps(&bound);
    script.extend([
        expect(Method::GET, CR_PATH, Reply::NotFound),
        event_with_reason("Populated"),
    ]);
    let (action, _) = run(bound, script, |_| {}).await;
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
    let mut elsewhere = running.clone();
    elsewhere["metadata"]["annotations"]["fillfs.io/populator"] = json!("data/generic-demo");
    let mut script = released_steps(&bound);
    script.extend([
        expect(Method::GET, CR_PATH, Reply::Json(cr_json(&seed_cr()))),
        event_with_reason("Populated"),
        expect(
            Method::GET,
            format!("/api/v1/namespaces/{OURS}/pods"),
            Reply::Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                "items": [running, elsewhere, pod("Failed", None)]})),
        ),
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
    let (action, _) = run(bound, script, |_| {}).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_claim_problem_that_is_fixed_is_cleared_then_filled() {
    let pvc = with(
        user_pvc(),
        "/metadata/annotations",
        json!({"fillfs.io/invalid": "volumeMode Block takes one disk image ..."}),
    );
    let script = vec![
        expect(Method::GET, CR_PATH, Reply::Json(cr_json(&seed_cr()))),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(user_pvc())).check(|b| {
            assert_eq!(
                b,
                &json!({"metadata": {"annotations": {"fillfs.io/invalid": null}}})
            )
        }),
    ];
    // Nothing more in this round: its copy of the claim is stale after the patch (the mock
    // would refuse the finalizer's resourceVersion); the patch wakes the next round.
    let (action, _) = run(pvc, script, |_| {}).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_fill_pod_the_api_server_refuses_is_reported_on_the_claim() {
    // E.g. a resources.limits smaller than its requests in generic.resources.
    let why = "Pod \"populate-x\" is invalid: spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit";
    let mut script = running_fill_prefix(&cr_json(&seed_cr()));
    script.extend([
        expect(Method::GET, pod_path(), Reply::NotFound),
        expect(
            Method::POST,
            format!("/api/v1/namespaces/{OURS}/pods"),
            Reply::Invalid(why),
        ),
        expect(Method::POST, EVENTS, Reply::Echo).check(move |b| {
            assert_eq!(b["reason"], "PodRejected");
            assert!(b["note"].as_str().unwrap().contains(why), "{b}");
        }),
    ]);
    let (result, metrics) = run_result(finalized(user_pvc()), script, |_| {}).await;
    assert!(result.is_err(), "retried by the error policy: {result:?}");
    assert!(metrics.render().contains("fillfs_populations_in_flight 0"));
}

#[tokio::test]
async fn a_populator_in_another_namespace_is_refused_without_reading_it() {
    let cross = with(user_pvc(), "/spec/dataSourceRef/namespace", json!("data"));
    let script = vec![
        expect(Method::POST, EVENTS, Reply::Echo).check(|b| {
            assert_eq!(b["reason"], "InvalidClaim");
            let note = b["note"].as_str().unwrap();
            assert!(note.contains("dataSourceRef.namespace \"data\""), "{note}");
        }),
        expect(Method::PATCH, user_pvc_path(), Reply::Json(user_pvc())).check(|b| {
            assert!(b["metadata"]["annotations"]["fillfs.io/invalid"].is_string());
        }),
    ];
    let (action, _) = run(cross, script, |_| {}).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn pvcs_that_are_not_ours_cause_no_requests() {
    let plain = with(user_pvc(), "/spec/dataSourceRef", Value::Null);
    assert_eq!(run(plain, vec![], |_| {}).await.0, Action::await_change());
    let other_kind = with(
        user_pvc(),
        "/spec/dataSourceRef/kind",
        json!("VolumeSnapshot"),
    );
    assert_eq!(
        run(other_kind, vec![], |_| {}).await.0,
        Action::await_change()
    );
    let in_our_namespace = with(user_pvc(), "/metadata/namespace", json!(OURS));
    assert_eq!(
        run(in_our_namespace, vec![], |_| {}).await.0,
        Action::await_change()
    );
    let bound_elsewhere = with(user_pvc(), "/spec/volumeName", json!("pv-9"));
    assert_eq!(
        run(bound_elsewhere, vec![], |_| {}).await.0,
        Action::await_change()
    );
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
fn generated_prime_pvc_and_pod_match_golden_files() {
    let pvc = pvc_from(&user_pvc());
    let cr = seed_cr();
    golden(
        "prime-pvc.yaml",
        &serde_yaml::to_string(&objects::prime_pvc(&pvc, &cr, &settings(), Some("node-7")))
            .unwrap(),
    );
    golden(
        "fill-pod.yaml",
        &serde_yaml::to_string(&objects::fill_pod(
            &pvc,
            &cr,
            &settings(),
            Some("node-7"),
            None,
        ))
        .unwrap(),
    );
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
    let pod = objects::fill_pod(&pvc, &cr, &settings(), None, Some("populate-x"));
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
    let raw: Value = serde_yaml::from_str(&text).unwrap();
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
    let wf: Value = serde_yaml::from_str(&text).unwrap();
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
    let pod = objects::fill_pod(&pvc_from(&user_pvc()), &seed_cr(), &settings(), None, None);
    let csi = pod.spec.unwrap().volumes.unwrap()[0].csi.clone().unwrap();
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
    let pod = objects::fill_pod(&pvc_from(&user_pvc()), &cr, &settings(), None, None);
    let attrs = pod.spec.unwrap().volumes.unwrap()[0]
        .csi
        .clone()
        .unwrap()
        .volume_attributes
        .unwrap();
    assert_eq!(attrs["throughput"], "953.674");
}
