//! WebSocket upgrades past the gateway: once the upstream answers `101 Switching Protocols`,
//! the client's connection and the upstream's are joined until either side closes. The request
//! is counted when the tunnel opens (its [`Record`] cannot wait for a body that never ends); the
//! bytes that pass count when it closes. Only WebSocket upgrades are asked for upstream
//! ([`headers::requested_upgrade`](super::headers::requested_upgrade)).

use http::header::HeaderValue;
use http::Response;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::record::{Record, UsageSink};
use crate::refusal::Refusal;

/// Counts the request and joins the client to the upstream once both connections are upgraded
/// (`asked`: the protocol the client asked for and its side of the tunnel). A 101 to a request
/// that asked for no upgrade, or one that cannot be upgraded, is refused instead.
pub fn open(
    response: &mut Response<Incoming>,
    record: Record,
    asked: Option<(HeaderValue, Option<OnUpgrade>)>,
) -> Result<(), Refusal> {
    let Some((_, Some(client))) = asked else {
        record.refused();
        return Err(Refusal::UpstreamUnavailable);
    };
    let upstream = hyper::upgrade::on(response);
    tokio::spawn(join(client, upstream, record.upgraded()));
    Ok(())
}

/// Joins an upgraded client connection to the upgraded upstream one until either side closes;
/// the bytes that pass count as the key's bytes in and out.
async fn join(client: OnUpgrade, upstream: OnUpgrade, sink: Option<UsageSink>) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            if let Some(sink) = sink {
                sink.add(sent, received);
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
    }
}
