//! The downloader against a real HTTP server on 127.0.0.1: a good download, the cache hit with the
//! server gone, a wrong hash, a 404, a connection cut mid-body, a server that stays silent and one
//! that sends more than minigpt reads. No partial file may remain.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::thread::JoinHandle;

use std::time::{Duration, Instant};

use minigpt::data::{fetch_cached, sha256_hex, Limits};

const BODY: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n";

/// Serves one connection per response, in order, then stops listening.
fn serve(responses: Vec<Vec<u8>>) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        for response in responses {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            let _ = stream.write_all(&response);
        } // dropping the stream closes the connection; dropping the listener stops the server
    });
    (base, handle)
}

fn ok_response(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn downloads_once_then_reuses_the_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let (base, server) = serve(vec![ok_response(BODY)]);
    let url = format!("{base}/input.txt");
    let hash = sha256_hex(BODY.as_bytes());
    let path = fetch_cached(&url, Some(&hash), cache.path(), &Limits::default()).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), BODY);
    assert_eq!(files_in(cache.path()).len(), 1);
    server.join().unwrap(); // the server is gone now
    let again = fetch_cached(&url, Some(&hash), cache.path(), &Limits::default()).unwrap();
    assert_eq!(again, path);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), BODY);
}

#[test]
fn the_cli_downloads_a_url_corpus_into_minigpt_cache() {
    let cache = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let text = BODY.repeat(40);
    let (base, server) = serve(vec![ok_response(&text)]);
    common::minigpt()
        .args([
            "train",
            "--data",
            &format!("{base}/corpus.txt"),
            "--block-size",
            "8",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "-q",
        ])
        .arg("--out")
        .arg(run.path().join("r"))
        .env("MINIGPT_CACHE", cache.path())
        .assert()
        .success();
    server.join().unwrap();
    let files = files_in(cache.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with("-corpus.txt"));
}

#[test]
fn a_wrong_hash_is_refused_and_nothing_is_cached() {
    let cache = tempfile::tempdir().unwrap();
    let (base, server) = serve(vec![ok_response(BODY)]);
    let err = fetch_cached(&format!("{base}/input.txt"), Some(&"0".repeat(64)), cache.path(), &Limits::default())
        .unwrap_err();
    assert!(format!("{err:#}").contains("SHA-256"), "{err:#}");
    assert!(files_in(cache.path()).is_empty(), "{:?}", files_in(cache.path()));
    server.join().unwrap();
}

#[test]
fn a_404_is_an_error_naming_the_status() {
    let cache = tempfile::tempdir().unwrap();
    let (base, server) =
        serve(vec![b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found".to_vec()]);
    let err = fetch_cached(&format!("{base}/missing.txt"), None, cache.path(), &Limits::default()).unwrap_err();
    assert!(format!("{err:#}").contains("404"), "{err:#}");
    assert!(files_in(cache.path()).is_empty());
    server.join().unwrap();
}

#[test]
fn a_connection_cut_mid_body_leaves_no_partial_file() {
    let cache = tempfile::tempdir().unwrap();
    let mut cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n".to_vec();
    cut.extend_from_slice(&BODY.as_bytes()[..20]);
    let (base, server) = serve(vec![cut]);
    let err = fetch_cached(&format!("{base}/input.txt"), None, cache.path(), &Limits::default()).unwrap_err();
    assert!(format!("{err:#}").contains("downloading"), "{err:#}");
    assert!(files_in(cache.path()).is_empty(), "{:?}", files_in(cache.path()));
    server.join().unwrap();
}

#[test]
fn an_unreachable_url_says_what_to_do_offline() {
    let cache = tempfile::tempdir().unwrap();
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = fetch_cached(&format!("http://127.0.0.1:{port}/input.txt"), None, cache.path(), &Limits::default())
        .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("offline? omit --data for the built-in Tiny Shakespeare"), "{message}");
    assert!(files_in(cache.path()).is_empty());
}

#[test]
fn train_without_data_uses_the_built_in_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // No --data, no MINIGPT_DATA, a cache with nothing in it: no network is touched.
    let out = common::minigpt()
        .env("MINIGPT_CACHE", tmp.path().join("cache"))
        .args(["train", "-q", "--max-steps", "3", "--eval-batches", "1", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["data"]["source"], minigpt::data::BUILTIN);
    assert_eq!(config["data"]["sha256"], minigpt::data::TINY_SHAKESPEARE_SHA256);
    assert_eq!(config["vocab"].as_array().unwrap().len(), 65);
    assert!(!tmp.path().join("cache").exists(), "the built-in corpus needs no cache");
    // And it resumes from the same built-in text.
    let more =
        common::minigpt().args(["train", "-q", "--resume", "--max-steps", "4", "--out"]).arg(&run).output().unwrap();
    assert!(more.status.success(), "{}", String::from_utf8_lossy(&more.stderr));
}

/// Accepts connections, reads each request and sends `head` (nothing, or headers and part of a
/// body), then stays silent while the client waits; the sockets close when the test ends.
fn silent(head: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = stream.write_all(head);
            open.push(stream);
        }
    });
    base
}

#[test]
fn a_server_that_stays_silent_times_out_with_one_clear_error() {
    let partial = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nFirst Citizen:";
    for (head, what) in [(&b""[..], "no answer at all"), (&partial[..], "silent mid-body")] {
        let cache = tempfile::tempdir().unwrap();
        let url = format!("{}/input.txt", silent(head));
        let limits = Limits { timeout: Duration::from_secs(1), ..Limits::default() };
        let start = Instant::now();
        let err = fetch_cached(&url, None, cache.path(), &limits).unwrap_err();
        let waited = start.elapsed();
        let message = format!("{err:#}");
        assert!(message.contains("no answer for 1 s (--download-timeout)"), "{what}: {message}");
        assert!(waited < Duration::from_secs(30), "{what}: waited {waited:?}");
        assert!(files_in(cache.path()).is_empty(), "{what}: {:?}", files_in(cache.path()));
    }
    // The command line: one error line.
    let tmp = tempfile::tempdir().unwrap();
    let out = common::minigpt()
        .env("MINIGPT_CACHE", tmp.path().join("cache"))
        .args(["train", "--download-timeout", "1", "--data", &format!("{}/input.txt", silent(b""))])
        .arg("--out")
        .arg(tmp.path().join("run"))
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.lines().count() == 1, "{stderr}");
    assert!(stderr.contains("no answer for 1 s (--download-timeout)"), "{stderr}");
}

#[test]
fn a_download_larger_than_minigpt_reads_is_stopped_and_removed() {
    let body = "x".repeat(5000);
    let streamed = format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{body}").into_bytes();
    let sized = ok_response(&body);
    for (response, what) in
        [(streamed, "no Content-Length: stopped while streaming"), (sized, "Content-Length: refused")]
    {
        let cache = tempfile::tempdir().unwrap();
        let (base, server) = serve(vec![response]);
        let limits = Limits { max_bytes: 1000, ..Limits::default() };
        let err = fetch_cached(&format!("{base}/input.txt"), None, cache.path(), &limits).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("more than minigpt reads (1000 bytes)"), "{what}: {message}");
        assert!(files_in(cache.path()).is_empty(), "{what}: {:?}", files_in(cache.path()));
        server.join().unwrap();
    }
}
