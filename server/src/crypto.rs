//! The process-wide crypto providers (ring for TLS and for JWT signatures), installed once at start-up.

/// Installs ring as the process-wide crypto of rustls (every TLS client and server: the CLI's
/// and OIDC's HTTP clients, the API and agent ports) and of `jsonwebtoken` (OIDC tokens).
/// Called first thing in `main`, before any client or server is built: a TLS client built
/// without a provider panics, and `jsonwebtoken` fixes its provider at its first use. Harmless
/// when already done; tests that build clients or servers in-process call it too.
pub fn install() {
    clusterclaw_agent::crypto::install_provider();
    crate::auth::oidc::install_crypto();
}

#[cfg(test)]
mod tests {
    #[test]
    fn installing_is_idempotent_and_clients_build_after_it() {
        super::install();
        super::install();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        for _ in 0..3 {
            reqwest::Client::builder()
                .tls_backend_rustls()
                .build()
                .expect("an HTTPS client builds once the provider is installed");
        }
    }
}
