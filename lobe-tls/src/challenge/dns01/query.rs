//! Single DNS queries to one chosen server, without a cache: the building block of the
//! CNAME chase, the zone discovery and the propagation check.
//!
//! A resolver library would cache answers and chase CNAMEs on its own; here every
//! question must reach the named server and come back as that server said it.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::runtime::{TokioRuntimeProvider, TokioTime};
use hickory_proto::tcp::TcpClientStream;
use hickory_proto::udp::UdpClientStream;
// hickory-proto's exchange, not hickory-client's `Client` (a thin wrapper over it): plain
// queries are core, and hickory-client comes only with the RFC 2136 provider.
use hickory_proto::xfer::{
    DnsExchange, DnsHandle, DnsMultiplexer, DnsRequest, DnsRequestOptions, FirstAnswer,
};

/// How long one query may take before the server counts as not answering.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a query got no usable answer.
#[derive(Debug, Clone)]
pub(crate) enum QueryError {
    /// No answer in time, or the transport failed.
    Unreachable(hickory_proto::ProtoError),
    /// The server answered with this error code (SERVFAIL, REFUSED, NOTIMP, ...).
    Rcode(ResponseCode),
}

impl std::error::Error for QueryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QueryError::Unreachable(e) => Some(e),
            QueryError::Rcode(_) => None,
        }
    }
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Unreachable(e) => write!(f, "no answer ({e})"),
            QueryError::Rcode(code) => write!(f, "answered {code}"),
        }
    }
}

/// Asks `server` one question. `recursion` sets the RD bit: on for a recursive resolver,
/// off for an authoritative server. Falls back to TCP when the UDP answer is truncated.
/// NOERROR and NXDOMAIN are answers; other response codes are errors.
pub(crate) async fn query(
    server: SocketAddr,
    name: &Name,
    record_type: RecordType,
    recursion: bool,
) -> Result<Message, QueryError> {
    let message = build_query(name, record_type, recursion);
    let response = send_udp(server, message.clone()).await?;
    let response = if response.truncated() {
        send_tcp(server, message).await?
    } else {
        response
    };
    match response.response_code() {
        ResponseCode::NoError | ResponseCode::NXDomain => Ok(response),
        code => Err(QueryError::Rcode(code)),
    }
}

fn build_query(name: &Name, record_type: RecordType, recursion: bool) -> Message {
    let mut message = Message::new();
    message
        .set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(recursion)
        .add_query(Query::query(name.clone(), record_type));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    message.set_edns(edns);
    message
}

async fn send_udp(server: SocketAddr, message: Message) -> Result<Message, QueryError> {
    let unreachable = QueryError::Unreachable;
    let stream = UdpClientStream::builder(server, TokioRuntimeProvider::new())
        .with_timeout(Some(QUERY_TIMEOUT))
        .build();
    let (client, background) = DnsExchange::connect::<_, _, TokioTime>(stream)
        .await
        .map_err(unreachable)?;
    let task = tokio::spawn(background);
    let result = exchange(&client, message).await;
    task.abort();
    result.map_err(unreachable)
}

async fn send_tcp(server: SocketAddr, message: Message) -> Result<Message, QueryError> {
    let unreachable = QueryError::Unreachable;
    let (stream, handle) = TcpClientStream::new(
        server,
        None,
        Some(QUERY_TIMEOUT),
        TokioRuntimeProvider::new(),
    );
    let multiplexer = DnsMultiplexer::with_timeout(stream, handle, QUERY_TIMEOUT, None);
    let (client, background) = DnsExchange::connect::<_, _, TokioTime>(multiplexer)
        .await
        .map_err(unreachable)?;
    let task = tokio::spawn(background);
    let result = exchange(&client, message).await;
    task.abort();
    result.map_err(unreachable)
}

async fn exchange(
    client: &DnsExchange,
    message: Message,
) -> Result<Message, hickory_proto::ProtoError> {
    let mut options = DnsRequestOptions::default();
    options.use_edns = true;
    let response = client
        .send(DnsRequest::new(message, options))
        .first_answer()
        .await?;
    Ok(response.into_message())
}

/// The records of `record_type` owned by `name` in the answer section.
pub(crate) fn answers<'a>(
    message: &'a Message,
    name: &'a Name,
    record_type: RecordType,
) -> impl Iterator<Item = &'a Record> + 'a {
    message
        .answers()
        .iter()
        .filter(move |r| r.record_type() == record_type && r.name() == name)
}

/// Whether a TXT record at `name` in the answer holds exactly `value`.
pub(crate) fn has_txt_value(message: &Message, name: &Name, value: &str) -> bool {
    answers(message, name, RecordType::TXT).any(|record| match record.data() {
        RData::TXT(txt) => {
            let joined: Vec<u8> = txt.iter().flat_map(|d| d.iter().copied()).collect();
            joined == value.as_bytes()
        }
        _ => false,
    })
}

/// Parses a name, always fully qualified.
pub(crate) fn fqdn(name: &str) -> crate::Result<Name> {
    let mut parsed = Name::from_ascii(name).map_err(|e| {
        crate::Error::dns(
            crate::DnsErrorKind::BadName,
            format!("bad DNS name {name:?}: {e}"),
        )
        .with_source(e)
    })?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;
    use crate::error::{DnsErrorKind, Error};

    #[test]
    fn a_bad_name_is_a_dns_error_that_keeps_the_parser_error() {
        let err = fqdn("a..example").unwrap_err();
        assert!(
            matches!(
                err,
                Error::Dns {
                    kind: DnsErrorKind::BadName,
                    provider: None,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("bad DNS name \"a..example\": "),
            "{err}"
        );
        assert!(
            err.source()
                .is_some_and(|s| s.downcast_ref::<hickory_proto::ProtoError>().is_some()),
            "{err:?}"
        );
    }
}
