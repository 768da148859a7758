//! Where minigpt's TensorFlow servers listen and what they say about it; workers named twice;
//! two chiefs on the same workers; clusters started the way cluster managers start them
//! (TF_CONFIG). Servers are child processes on free ports of 127.0.0.1 (or inside a network
//! namespace of their own, reachable from nowhere else), killed by PID when a test ends.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::cluster::{
    cluster_flag, command, corpus, fails_with, fails_with_env, free_local_address, losses, train, train_with, Server,
    Training,
};

/// This machine's addresses that are not loopback (IPv6 link-local ones left out: they need a
/// scope to be reached).
fn external_addresses() -> Vec<IpAddr> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, read here and freed once.
    unsafe {
        assert_eq!(libc::getifaddrs(&mut list), 0);
        let mut at = list;
        while !at.is_null() {
            let entry = &*at;
            at = entry.ifa_next;
            if entry.ifa_addr.is_null() {
                continue;
            }
            let ip = match (*entry.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let a = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => IpAddr::from((*(entry.ifa_addr as *const libc::sockaddr_in6)).sin6_addr.s6_addr),
                _ => continue,
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
            if !ip.is_loopback() && !link_local {
                found.push(ip);
            }
        }
        libc::freeifaddrs(list);
    }
    found
}

/// Whether a TCP connection to `address` is refused (not merely unanswered).
fn refused(address: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
        Ok(_) => false,
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{address}: {e}");
            true
        }
    }
}

/// Every address of this machine but `bound` refuses connections at `bound`'s port.
fn only_reachable_at(bound: SocketAddr) {
    assert!(TcpStream::connect_timeout(&bound, Duration::from_secs(5)).is_ok(), "{bound} refuses");
    let others = external_addresses();
    for ip in &others {
        assert!(refused(SocketAddr::new(*ip, bound.port())), "reached through {ip}");
    }
    if others.is_empty() {
        eprintln!("this machine has no address but loopback: nothing else to connect through");
    } else {
        eprintln!("{bound}: refused through {others:?}");
    }
}

#[test]
fn a_server_and_a_chief_listen_only_on_their_address() {
    let server = Server::start();
    let bound: SocketAddr = server.address.parse().unwrap();
    assert_eq!(server.listening(), [bound]);
    assert_eq!(server.stderr(), "", "a loopback server has nothing to warn about");
    only_reachable_at(bound);

    // A host name is resolved once and bound as resolved.
    let port = free_local_address().rsplit_once(':').unwrap().1.to_string();
    let named = Server::at(&format!("localhost:{port}"));
    let resolved = named.listening();
    assert_eq!(resolved.len(), 1, "{resolved:?}");
    assert!(resolved[0].ip().is_loopback() && resolved[0].port().to_string() == port, "{resolved:?}");
    assert!(named.line.contains(&format!("grpc://{}", resolved[0])), "{}", named.line);

    // IPv6 loopback, where the machine has it.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let port = std::net::TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port();
        let v6 = Server::at(&format!("[::1]:{port}"));
        assert_eq!(v6.listening(), [format!("[::1]:{port}").parse().unwrap()]);
    }

    // The chief's own server (default: a free port of 127.0.0.1), while it trains.
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let cluster = cluster_flag(&[&server]);
    let mut training = Training::spawn(&corpus, &tmp.path().join("run"), &["--log-every", "1", "--cluster", &cluster]);
    training.until_step(3);
    let chief = minigpt::listen::listening(training.child.0.id()).unwrap();
    assert_eq!(chief.len(), 1, "the chief listens on {chief:?}");
    assert_eq!(chief[0].ip(), IpAddr::from([127, 0, 0, 1]), "the chief listens on {chief:?}");
    only_reachable_at(chief[0]);
}

/// A network namespace of its own with `10.9.9.9` on its loopback interface: an address that is
/// not loopback, reachable from nowhere but the namespace. `None` where namespaces cannot be made.
fn isolated(listen: &str) -> Option<Command> {
    let ok = Command::new("unshare").args(["-rn", "ip", "link", "set", "lo", "up"]).output();
    if !ok.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: `unshare -rn` and `ip` cannot make a network namespace here");
        return None;
    }
    let script =
        format!("ip link set lo up && ip addr add 10.9.9.9/32 dev lo && exec \"$0\" server --listen '{listen}'");
    let mut unshare = Command::new("unshare");
    unshare.args(["-rn", "sh", "-c", &script]).arg(assert_cmd::cargo::cargo_bin("minigpt"));
    unshare.env_remove("TF_CONFIG").env_remove("TF_CPP_MIN_LOG_LEVEL");
    Some(unshare)
}

#[test]
fn a_server_beyond_loopback_says_what_it_exposes() {
    for (listen, bound, exposed) in [
        ("10.9.9.9:2222", "10.9.9.9:2222", "listens on 10.9.9.9:2222, beyond this machine"),
        ("0.0.0.0:2222", "0.0.0.0:2222", "listens on every interface of this machine at port 2222 (0.0.0.0:2222)"),
        ("[::]:2222", "[::]:2222", "listens on every interface of this machine at port 2222 ([::]:2222)"),
    ] {
        let Some(unshare) = isolated(listen) else { return };
        let server = Server::launch(unshare, listen);
        assert_eq!(server.listening(), [bound.parse::<SocketAddr>().unwrap()], "{listen}");
        let stderr = server.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].starts_with("warning: TensorFlow's server ") && lines[0].contains(exposed), "{stderr}");
        assert!(
            lines[0].contains("can run TensorFlow operations as this user, including reading and writing files")
                && lines[0].contains("use it only on a network you trust"),
            "{stderr}"
        );
    }
}

#[test]
fn addresses_that_are_not_this_machines_and_workers_named_twice_give_one_line() {
    let port = free_local_address().rsplit_once(':').unwrap().1.to_string();
    fails_with(
        &["server", "--listen", &format!("203.0.113.7:{port}")],
        "203.0.113.7 is not an address of this machine",
    );
    fails_with(&["server", "--listen", &format!("no-such-host.invalid:{port}")], "cannot resolve the host name");
    fails_with(&["server"], "give --listen HOST:PORT");

    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let (corpus, out) = (corpus.to_str().unwrap(), tmp.path().join("run"));
    let out = out.to_str().unwrap();
    let train = |extra: &[&str], needle: &str| {
        fails_with(&[&["train", "--data", corpus, "--out", out, "--worker-timeout", "2"][..], extra].concat(), needle)
    };
    let (p, q) = (free_local_address(), free_local_address());
    let p_port = p.rsplit_once(':').unwrap().1;
    train(&["--cluster", &format!("worker=localhost:{p_port},{p}")], &format!("are the same worker (both reach {p})"));
    train(&["--cluster", &format!("worker={p},[::ffff:127.0.0.1]:{p_port}")], "are the same worker");
    train(&["--listen", &p, "--cluster", &format!("worker=localhost:{p_port}")], "is the chief's own address");
    train(&["--cluster", &format!("worker=0.0.0.0:{p_port}")], "not 0.0.0.0");
    train(&["--cluster", "worker=no-such-host.invalid:2222"], "cannot resolve the host name");
    // ... at once, --worker-timeout's 300 s notwithstanding (fails_with allows 120 s).
    fails_with(
        &["train", "--data", corpus, "--out", out, "--cluster", "worker=no-such-host.invalid:2222"],
        "worker task 0: no-such-host.invalid:2222: cannot resolve the host name",
    );
    // A name from TF_CONFIG (a cluster manager's, for a task still starting) is waited for, up to
    // --worker-timeout, as said on a warning line.
    let tf_config = format!(
        r#"{{"cluster": {{"chief": ["{p}"], "worker": ["no-such-host.invalid:2"]}}, "task": {{"type": "chief", "index": 0}}}}"#
    );
    let waited = common::minigpt()
        .args(["train", "--data", corpus, "--out", out, "--worker-timeout", "1"])
        .env("TF_CONFIG", &tf_config)
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&waited.stderr);
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.starts_with("warning: worker task 0: no-such-host.invalid:2: cannot resolve the host name"),
        "{stderr}"
    );
    assert!(first.ends_with("waiting for it to resolve: 0 s of 1 s (--worker-timeout)"), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("error: ") && last.contains("still after 1 s (--worker-timeout)"), "{stderr}");

    // A host name that resolves to loopback (Debian's /etc/hosts maps the machine's own name to
    // 127.0.1.1) is refused: no other machine would reach it. `localhost` is meant so.
    let host = minigpt::cluster::Listen::parse(&format!("0.0.0.0:{port}")).unwrap().name;
    let host = host.rsplit_once(':').unwrap().0.to_string();
    match std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 1)).ok().and_then(|mut a| a.next()) {
        Some(own) if own.ip().is_loopback() => {
            fails_with(&["server", "--listen", &format!("{host}:{port}")], "a loopback address, where no other machine")
        }
        own => eprintln!("{host} resolves to {own:?}, not loopback: nothing to refuse"),
    }
    train(&["--listen", &p], "give --cluster too");
    train(&["--listen", &format!("203.0.113.7:{p_port}"), "--cluster", &format!("worker={q}")], "not an address");
}

/// Two chiefs train on the same two workers at the same time, each what one process trains
/// (losses within 1e-6 relative), with nothing on stderr: neither resets the other's sessions.
#[test]
fn two_chiefs_on_the_same_workers_train_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let (a, b) = (Server::start(), Server::start());
    let cluster = cluster_flag(&[&a, &b]);
    let flags = ["--block-size", "16", "--batch-size", "32"];
    let reference = tmp.path().join("reference");
    train(&corpus, &reference, 1500, &flags);
    let args = |steps: &'static str| {
        [&["--shuffle", "none", "--log-every", "1", "--max-steps", steps][..], &flags, &["--cluster", &cluster]]
            .concat()
    };
    let (first_out, second_out) = (tmp.path().join("first"), tmp.path().join("second"));
    // The first trains until it is stopped, once the second has trained beside it.
    let mut first = Training::spawn(&corpus, &first_out, &args("1000000"));
    first.until_step(10);
    let mut second = Training::spawn(&corpus, &second_out, &args("300"));
    let (_, status, stderr) = second.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(stderr, "", "the second chief");
    assert!(first.child.0.try_wait().unwrap().is_none(), "the first chief ended");
    first.child.signal(libc::SIGINT);
    let (_, status, stderr) = first.finish();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.starts_with("interrupted at step ") && stderr.lines().count() == 1, "the first chief: {stderr}");
    let (first_losses, expected) = (losses(&first_out), losses(&reference));
    assert!(first_losses.len() >= 100, "the first chief trained {} steps", first_losses.len());
    let n = first_losses.len().min(expected.len());
    common::assert_close("first chief", &first_losses[..n], &expected[..n], 0.0, 1e-6);
    common::assert_close("second chief", &losses(&second_out), &expected[..300], 0.0, 1e-6);
}

/// `{"cluster": CLUSTER, "task": {"type": KIND, "index": INDEX}}`.
fn tf_config(cluster: &serde_json::Value, kind: &str, index: usize) -> String {
    serde_json::json!({"cluster": cluster, "task": {"type": kind, "index": index}}).to_string()
}

/// A `minigpt server` started with TF_CONFIG only.
fn worker_of(cluster: &serde_json::Value, index: usize, address: &str) -> Server {
    let mut server = command();
    server.arg("server").env("TF_CONFIG", tf_config(cluster, "worker", index));
    Server::launch(server, address)
}

#[test]
fn three_processes_started_by_tf_config_train_what_cluster_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let (chief, w0, w1) = (free_local_address(), free_local_address(), free_local_address());
    let cluster = serde_json::json!({"chief": [chief], "worker": [w0, w1]});
    // Worker 1 runs `minigpt train`, as every task of a job may run the same command: on a
    // worker task it serves.
    let a = worker_of(&cluster, 0, &w0);
    let mut same_command = command();
    same_command.args(["train", "--out", "unused"]).env("TF_CONFIG", tf_config(&cluster, "worker", 1));
    let b = Server::launch(same_command, &w1);
    assert_eq!(a.listening(), [w0.parse().unwrap()]);
    let flags = ["--block-size", "16", "--batch-size", "32"];

    // The chief: TF_CONFIG only; it listens at its entry.
    let by_tf_config = tmp.path().join("tf_config");
    let config = tf_config(&cluster, "chief", 0);
    let mut training = Training::spawn_with(
        &corpus,
        &by_tf_config,
        &[&flags[..], &["--shuffle", "none", "--log-every", "1", "--max-steps", "100"]].concat(),
        &[("TF_CONFIG", &config)],
    );
    training.until_step(2);
    assert_eq!(minigpt::listen::listening(training.child.0.id()).unwrap(), [chief.parse().unwrap()]);
    let (_, status, stderr) = training.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(stderr, "");

    // The same with --cluster, TF_CONFIG ignored (explicit flags win, even over a broken one).
    let by_flag = tmp.path().join("flag");
    let workers = cluster_flag(&[&a, &b]);
    let explicit = [&flags[..], &["--cluster", &workers]].concat();
    train_with(&corpus, &by_flag, 100, &explicit, &[("TF_CONFIG", "{not json")]);
    let expected = losses(&by_flag);
    assert_eq!(expected.len(), 100);
    assert_eq!(losses(&by_tf_config), expected, "TF_CONFIG trains what --cluster trains");
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(by_tf_config.join("config.json")).unwrap()).unwrap();
    assert_eq!(recorded["cluster"], serde_json::json!([w0, w1]));

    // No chief: worker 0 is the chief and trains on the others (here the worker at w1). As on
    // Kubernetes, TF_CONFIG names it by a host name and --listen gives its address.
    let lead = free_local_address();
    let lead_port = lead.rsplit_once(':').unwrap().1;
    let workers_only = serde_json::json!({"worker": [format!("localhost:{lead_port}"), w1]});
    let (by_lead, by_one) = (tmp.path().join("lead"), tmp.path().join("one"));
    let listen = [&flags[..], &["--listen", &lead]].concat();
    train_with(&corpus, &by_lead, 50, &listen, &[("TF_CONFIG", &tf_config(&workers_only, "worker", 0))]);
    train(&corpus, &by_one, 50, &[&flags[..], &["--cluster", &cluster_flag(&[&b])]].concat());
    assert_eq!(losses(&by_lead), losses(&by_one));
}

#[test]
fn malformed_tf_config_gives_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let out = tmp.path().join("run");
    let train = [&["train", "--data"][..], &[corpus.to_str().unwrap(), "--out", out.to_str().unwrap()]].concat();
    let cluster = serde_json::json!({"chief": ["127.0.0.1:2222"], "worker": ["127.0.0.1:2223"]});
    for (args, config, needle) in [
        (&train, "{\"cluster\": ".to_string(), "TF_CONFIG is not the JSON expected"),
        (&train, tf_config(&cluster, "worker", 5), "its cluster lists 1 worker task"),
        (&train, tf_config(&cluster, "evaluator", 0), "task type is \"evaluator\""),
        (
            &train,
            tf_config(&serde_json::json!({"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}), "worker", 0),
            "runs no parameter servers",
        ),
        (
            &[&train[..], &["--listen", "127.0.0.1:2224"]].concat(),
            tf_config(&cluster, "chief", 0),
            "--listen 127.0.0.1:2224: TF_CONFIG has this task at 127.0.0.1:2222, where the others reach it",
        ),
        (
            &vec!["server"],
            tf_config(&cluster, "chief", 0),
            "TF_CONFIG makes this task the chief (127.0.0.1:2222): run `minigpt train`",
        ),
        (
            &train,
            tf_config(&serde_json::json!({"chief": ["203.0.113.7:2222"], "worker": ["127.0.0.1:2"]}), "chief", 0),
            "is not where this process can listen: give --listen",
        ),
    ] {
        fails_with_env(args, &[("TF_CONFIG", &config)], needle);
    }
}

/// deploy/tfjob.yaml: a TFJob whose Chief runs `minigpt train` and whose Workers run `minigpt
/// server`, each listening on its pod's IP at the TFJob port 2222, with arguments minigpt accepts.
#[test]
fn the_tfjob_manifest_runs_a_chief_and_workers_minigpt_accepts() {
    use clap::Parser;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/tfjob.yaml");
    let job: serde_json::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!((job["apiVersion"].as_str(), job["kind"].as_str()), (Some("kubeflow.org/v1"), Some("TFJob")));
    let replicas = &job["spec"]["tfReplicaSpecs"];
    for (kind, command) in [("Chief", "train"), ("Worker", "server")] {
        let container = &replicas[kind]["template"]["spec"]["containers"][0];
        assert_eq!(container["name"], "tensorflow", "{kind}: TFJob's container name");
        assert_eq!(container["ports"][0]["containerPort"], 2222, "{kind}");
        assert_eq!(container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP", "{kind}");
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().replace("$(POD_IP)", "10.0.0.7"))
            .collect();
        assert_eq!(args[0], command, "{kind}");
        assert!(args.windows(2).any(|w| w == ["--listen", "10.0.0.7:2222"]), "{kind}: {args:?}");
        let parsed = minigpt::cli::Cli::try_parse_from(std::iter::once("minigpt".to_string()).chain(args));
        assert!(parsed.is_ok(), "{kind}: {}", parsed.unwrap_err());
    }
    let workers = replicas["Worker"]["replicas"].as_u64().unwrap();
    let chief_args = replicas["Chief"]["template"]["spec"]["containers"][0]["args"].to_string();
    let batch: u64 =
        chief_args.split("\"--batch-size\",\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    assert_eq!(batch % workers, 0, "--batch-size {batch} must divide among {workers} workers");
}
