//! `deploy/`: what can be checked without a cluster or systemd. The Kubernetes manifests
//! parse and agree with the topology their ConfigMap ships (probes on the control port,
//! the listener's port, the mount as a directory); that topology runs, answers the probes
//! and follows a kubelet-style `..data` swap; the systemd unit is `Type=notify` and
//! hardened, and envgate speaks the notify protocol (READY, WATCHDOG, STOPPING); the
//! container's final image has no toolchain and runs as non-root.

mod support;

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_norway::Value;
use support::*;

fn deploy(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy")
            .join(name),
    )
    .unwrap()
}

/// The documents of the manifest, by kind.
fn manifests() -> HashMap<String, Value> {
    let text = deploy("kubernetes.yaml");
    let mut out = HashMap::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v = <Value as serde::Deserialize>::deserialize(doc).unwrap();
        let kind = v["kind"].as_str().unwrap().to_string();
        assert!(out.insert(kind.clone(), v).is_none(), "two {kind}");
    }
    out
}

fn port_of(bind: &str) -> u64 {
    bind.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_manifests_agree_with_the_topology_they_ship() {
    let m = manifests();
    for kind in [
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(m.contains_key(kind), "no {kind}");
    }
    let topo_text = m["ConfigMap"]["data"]["envgate.yaml"].as_str().unwrap();
    let topo: Value = serde_norway::from_str(topo_text).unwrap();
    // The shipped topology is valid (with its token file where the Secret would be).
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let here = topo_text.replace(
        topo["control"]["token_file"].as_str().unwrap(),
        token.to_str().unwrap(),
    );
    envgate::config::parse(&here, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let control_port = port_of(topo["control"]["bind"].as_str().unwrap());
    let http_port = port_of(topo["listeners"][0]["bind"].as_str().unwrap());

    let pod = &m["Deployment"]["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let ports: HashMap<&str, u64> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports["http"], http_port);
    assert_eq!(ports["control"], control_port);
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"],
        Value::from("/ready")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["port"],
        Value::from("control")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"],
        Value::from("/healthz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["port"],
        Value::from("control")
    );
    // The topology is mounted as a directory (no subPath: updates reach the pod) and the
    // command line reads it from there.
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "topology")
        .unwrap();
    assert!(mount.get("subPath").is_none());
    let mount_path = mount["mountPath"].as_str().unwrap();
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    assert_eq!(Path::new(config).parent().unwrap(), Path::new(mount_path));
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "topology")
        .unwrap();
    assert_eq!(
        volume["configMap"]["name"],
        m["ConfigMap"]["metadata"]["name"]
    );
    // The token the control endpoint needs is mounted where the topology says.
    let token_file = topo["control"]["token_file"].as_str().unwrap();
    assert!(c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| token_file.starts_with(v["mountPath"].as_str().unwrap()) && v["name"] == "token"));
    // Draining fits in the grace period: the preStop pause plus the 30 s drain.
    let pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > pause + 30);
    assert!(pod["affinity"]["podAntiAffinity"].is_mapping());
    // The Service, the budget and the autoscaler point at these pods.
    let labels = &m["Deployment"]["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&m["Service"]["spec"]["selector"], labels);
    assert_eq!(
        m["Service"]["spec"]["ports"][0]["targetPort"],
        Value::from("http")
    );
    assert_eq!(
        &m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        labels
    );
    assert_eq!(
        m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"],
        m["Deployment"]["metadata"]["name"]
    );
}

/// The ConfigMap's topology, on local ports and nodes, in the layout the kubelet gives a
/// mounted ConfigMap (`envgate.yaml -> ..data/envgate.yaml`, `..data -> ..<version>`):
/// envgate answers the probes, serves, and follows the swap of `..data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configmap_topology_answers_the_probes_and_follows_a_swap() {
    // Two nodes that both answer "one", then a node that answers "two" in app-2's place.
    let (one, also_one, two) = (
        Upstream::start("one").await,
        Upstream::start("one").await,
        Upstream::start("two").await,
    );
    let shipped = manifests()["ConfigMap"]["data"]["envgate.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let (http, control) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let local = |second: &str| {
        shipped
            .replace("0.0.0.0:8080", &format!("127.0.0.1:{http}"))
            .replace("0.0.0.0:9090", &format!("127.0.0.1:{control}"))
            .replace("company.com:8080", &format!("company.com:{http}"))
            .replace("/etc/envgate-token/token", token.to_str().unwrap())
            .replace("10.0.0.11:8000", &one.addr.to_string())
            .replace("10.0.0.12:8000", second)
    };
    let mount = dir.path().join("etc-envgate");
    std::fs::create_dir(&mount).unwrap();
    let version = |name: &str, text: &str| {
        std::fs::create_dir(mount.join(name)).unwrap();
        std::fs::write(mount.join(name).join("envgate.yaml"), text).unwrap();
    };
    // First version: both nodes answer `one`; second: app-2 is `two`.
    version("..2026_11_27_1", &local(&also_one.addr.to_string()));
    std::os::unix::fs::symlink("..2026_11_27_1", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/envgate.yaml", mount.join("envgate.yaml")).unwrap();
    let _child = Child(
        Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args(["run", "--workers", "2", "--access-log", "off", "--config"])
            .arg(mount.join("envgate.yaml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", control))
                .await
                .is_ok()
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(control, "localhost", "/ready").await.status == 200
        })
        .await
    );
    assert_eq!(get(control, "localhost", "/healthz").await.status, 200);
    assert_eq!(get(http, "company.com", "/").await.node(), "one");

    version("..2026_11_27_2", &local(&two.addr.to_string()));
    std::os::unix::fs::symlink("..2026_11_27_2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(mount.join("..2026_11_27_1")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(http, "company.com", "/").await.node() == "two"
                || get(http, "company.com", "/").await.node() == "two"
        })
        .await,
        "the ..data swap was not applied"
    );
}

#[test]
fn the_systemd_units_are_notify_and_hardened() {
    for name in ["envgate.service", "envgate@.service"] {
        unit_is_notify_and_hardened(&deploy(name));
    }
    // The template takes over from its sibling through the socket both use.
    let template = deploy("envgate@.service");
    assert!(template.contains(
        "--upgrade-socket /run/envgate/upgrade.sock --takeover /run/envgate/upgrade.sock"
    ));
    assert!(template.contains("RuntimeDirectoryPreserve=yes"));
}

fn unit_is_notify_and_hardened(unit: &str) {
    let keys: HashMap<&str, &str> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    assert_eq!(keys["Type"], "notify");
    assert!(keys.contains_key("WatchdogSec"));
    assert!(keys["ExecReload"].contains("envgate apply"));
    for (k, v) in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("User", "envgate"),
    ] {
        assert_eq!(keys.get(k), Some(&v), "{k}");
    }
}

#[test]
fn the_image_runs_without_a_toolchain_as_non_root() {
    let file = deploy("Dockerfile");
    let last_stage = file.rsplit("\nFROM ").next().unwrap();
    assert!(last_stage.starts_with("gcr.io/distroless/"), "{last_stage}");
    assert!(!last_stage.contains("cargo") || last_stage.contains("COPY --from=build"));
    assert!(!last_stage.contains("RUN "), "{last_stage}");
    assert!(last_stage.contains("USER nonroot"), "{last_stage}");
}

/// envgate under a `Type=notify` unit: READY=1 once it serves, WATCHDOG=1 at half the
/// watchdog period, STOPPING=1 on SIGTERM.
#[test]
fn envgate_speaks_the_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify");
    let sock = UnixDatagram::bind(&socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = free_port();
    let conf = dir.path().join("envgate.yaml");
    std::fs::write(
        &conf,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\nnodes: {{ a: {{ address: \"127.0.0.1:9\" }} }}\nenvironments:\n  e: {{ entries: [\":{port}\"], nodes: [a] }}\n"),
    )
    .unwrap();
    // systemd names the watched process in WATCHDOG_PID: the shell's pid is envgate's
    // after `exec`.
    let mut child = Child(
        Command::new("sh")
            .arg("-c")
            .arg("WATCHDOG_PID=$$ exec \"$0\" run --workers 1 --access-log off --config \"$1\"")
            .arg(env!("CARGO_BIN_EXE_envgate"))
            .arg(&conf)
            .env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "200000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut seen = Vec::new();
    let receive_until = |want: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut buf = [0u8; 512];
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let hit = msg.lines().any(|l| l == want);
                seen.push(msg);
                if hit {
                    return;
                }
            }
        }
        panic!("no {want}: {seen:?}");
    };
    receive_until("READY=1", &mut seen);
    receive_until("WATCHDOG=1", &mut seen);
    receive_until("WATCHDOG=1", &mut seen);
    assert!(Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    receive_until("STOPPING=1", &mut seen);
    assert!(child.0.wait().unwrap().success());
}
