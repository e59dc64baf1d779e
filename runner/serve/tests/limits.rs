//! The server's patience, against a real server on port 0: a client that trickles its
//! headers is disconnected after the header timeout, connections beyond the limit are
//! closed at once, and the server keeps answering others throughout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn start(limits: huse_serve::Limits) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(huse_serve::serve_with(vec![], "127.0.0.1:0".parse().unwrap(), limits, |a| tx.send(a).unwrap()))
            .unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap().to_string()
}

fn home(addr: &str) -> u16 {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Whether the server has closed `c` (a read gives end of file or a reset).
fn closed(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut b = [0u8; 512];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // an error response before closing
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn slow_clients_are_cut_off_and_connections_are_bounded() {
    let addr = start(huse_serve::Limits { header_timeout: Duration::from_secs(1), max_connections: 16 });
    assert_eq!(home(&addr), 200);
    // Ten clients that send a header line a byte at a time and never finish.
    let mut slow: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut c = TcpStream::connect(&addr).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").unwrap();
            c
        })
        .collect();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        for c in &mut slow {
            let _ = c.write_all(b"a");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, c) in slow.iter_mut().enumerate() {
        assert!(closed(c), "slow client {i} is still connected after the header timeout");
    }
    // Beyond the limit, new connections are closed at once; the server still answers after.
    let idle: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(&addr).unwrap();
    assert!(closed(&mut extra), "a connection beyond the limit is closed");
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(home(&addr), 200);
}
