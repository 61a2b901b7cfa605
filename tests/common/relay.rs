//! [`Relay`]: a TCP relay in front of a server that can make every connection open through it
//! half-open at once ([`Relay::hold`]): the connections stay up and nothing passes on them, as
//! after a partition or a dropped NAT entry, while connections opened afterwards pass as usual.
// Included with `#[path]` by the test files that use it.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A relay on a free port of 127.0.0.1; dropping it stops accepting.
pub struct Relay {
    addr: SocketAddr,
    /// The generation of connections that pass: a connection opened in an older one is held.
    generation: watch::Sender<u64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays every connection to `127.0.0.1:port`.
    pub async fn start(port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (generation, _) = watch::channel(0);
        let passing = generation.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                    continue;
                };
                let born = *passing.borrow();
                let (c_read, c_write) = client.into_split();
                let (s_read, s_write) = server.into_split();
                tokio::spawn(pass(c_read, s_write, born, passing.subscribe()));
                tokio::spawn(pass(s_read, c_write, born, passing.subscribe()));
            }
        });
        Relay {
            addr,
            generation,
            accepting,
        }
    }

    /// `redis://` at the relay.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Every connection open now passes nothing from here on, and stays open.
    pub fn hold(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies `from` to `to` while the relay's generation is `born`; then holds both, passing
/// nothing, until the test ends.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    born: u64,
    mut generation: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *generation.borrow() != born {
                        break;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = generation.changed() => {
                if changed.is_err() || *generation.borrow() != born {
                    break;
                }
            }
        }
    }
    // Held: neither closed nor read, as a connection whose packets go nowhere.
    std::future::pending::<()>().await;
    drop((from, to));
}
