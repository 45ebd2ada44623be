//! The agent's connection to the control plane: gRPC over TLS, with the host certificate once
//! enrolled. Every connection is opened by the agent.

use std::time::Duration;

use clusterclaw_proto::agent::agent_service_client::AgentServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::enroll::HostIdentity;

/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url:?} is not a server URL such as https://cp.example.com:7443: {problem}")]
    BadUrl { url: String, problem: String },
    #[error("TLS set-up for {url}: {source}")]
    Tls {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

fn endpoint(
    url: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Endpoint, ClientError> {
    let bad = |problem: String| ClientError::BadUrl {
        url: url.to_string(),
        problem,
    };
    if !url.starts_with("https://") {
        return Err(bad(
            "the agent port always uses TLS, so the URL must start with https://".into(),
        ));
    }
    let ep = Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?;
    let host = ep
        .uri()
        .host()
        .ok_or_else(|| bad("no host name".into()))?
        .trim_matches(['[', ']'])
        .to_string();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ep = ep
        .tls_config(tls)
        .map_err(|source| ClientError::Tls {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(ep)
}

/// A client for `Enroll`, trusting `ca_pem`, presenting no certificate.
pub fn anonymous(url: &str, ca_pem: &str) -> Result<AgentServiceClient<Channel>, ClientError> {
    Ok(AgentServiceClient::new(
        endpoint(url, ca_pem, None)?.connect_lazy(),
    ))
}

/// A client that authenticates as the enrolled host.
pub fn authenticated(id: &HostIdentity) -> Result<AgentServiceClient<Channel>, ClientError> {
    let ep = endpoint(
        &id.record.server,
        &id.ca_pem,
        Some((&id.cert_pem, &id.key_pem)),
    )?;
    Ok(AgentServiceClient::new(ep.connect_lazy()))
}
