//! The process-wide TLS crypto provider (ring), installed once at start-up.

/// Installs ring as rustls' process-wide crypto provider. Called first thing in `main`, before
/// any TLS client or server is built (a client built without a provider panics); harmless when
/// a provider is already installed.
pub fn install_provider() {
    // The only error is "already installed", which is what this call wants anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn installing_twice_leaves_a_provider() {
        super::install_provider();
        super::install_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        // A rustls client config built from the process default works.
        let roots = rustls::RootCertStore::empty();
        let _ = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
    }
}
