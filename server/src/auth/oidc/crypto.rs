//! Signature verification for `jsonwebtoken` on top of ring, the crypto library the rest of
//! the server (TLS, PKI) already uses. Verification only: this server never signs a JWT, and
//! shared-secret (HS*) algorithms are not implemented at all.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind, Result};
use jsonwebtoken::jwk::ThumbprintHash;
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::signature as sig;

/// The provider installed by [`install`].
static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: |_| Err(unsupported("private RSA keys")),
        rsa_pub_components_from_public_key: |_| Err(unsupported("DER RSA public keys")),
        ec_pub_components_from_private_key: |_, _| Err(unsupported("private EC keys")),
        ed_pub_components_from_private_key: |_, _| Err(unsupported("private Ed25519 keys")),
        compute_digest,
    },
};

/// Makes ring the process-wide crypto of `jsonwebtoken`. Harmless when already done. It must
/// run before the first use of `jsonwebtoken` in the process: [`crate::crypto::install`] calls
/// it at start-up.
pub(super) fn install() {
    let _ = RING_PROVIDER.install_default();
}

fn unsupported(what: &str) -> Error {
    ErrorKind::Provider(format!(
        "{what} are not supported: this server only verifies"
    ))
    .into()
}

fn no_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    Err(unsupported("signing keys"))
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(unsupported("other digests")),
    };
    Ok(ring::digest::digest(algorithm, data).as_ref().to_vec())
}

/// A public key bound to exactly one algorithm.
struct RingVerifier {
    algorithm: Algorithm,
    key: DecodingKey,
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    let family = match algorithm {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => AlgorithmFamily::Rsa,
        Algorithm::ES256 | Algorithm::ES384 => AlgorithmFamily::Ec,
        Algorithm::EdDSA => AlgorithmFamily::Ed,
        // HS256/384/512 and anything added later: a shared secret is never accepted.
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    if key.family() != family {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier {
        algorithm: *algorithm,
        key: key.clone(),
    }))
}

impl RingVerifier {
    fn check(
        &self,
        msg: &[u8],
        signature: &[u8],
    ) -> std::result::Result<(), ring::error::Unspecified> {
        let rsa: &'static sig::RsaParameters = match self.algorithm {
            Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
            Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
            Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
            Algorithm::ES256 => {
                return self.unparsed(&sig::ECDSA_P256_SHA256_FIXED, msg, signature);
            }
            Algorithm::ES384 => {
                return self.unparsed(&sig::ECDSA_P384_SHA384_FIXED, msg, signature);
            }
            Algorithm::EdDSA => return self.unparsed(&sig::ED25519, msg, signature),
            _ => return Err(ring::error::Unspecified),
        };
        match self.key.kind() {
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                sig::RsaPublicKeyComponents { n, e }.verify(rsa, msg, signature)
            }
            DecodingKeyKind::SecretOrDer(der) => {
                sig::UnparsedPublicKey::new(rsa, der).verify(msg, signature)
            }
        }
    }

    fn unparsed(
        &self,
        algorithm: &'static dyn sig::VerificationAlgorithm,
        msg: &[u8],
        signature: &[u8],
    ) -> std::result::Result<(), ring::error::Unspecified> {
        match self.key.kind() {
            DecodingKeyKind::SecretOrDer(public) => {
                sig::UnparsedPublicKey::new(algorithm, public).verify(msg, signature)
            }
            DecodingKeyKind::RsaModulusExponent { .. } => Err(ring::error::Unspecified),
        }
    }
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        self.check(msg, signature)
            .map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_secret_algorithms_have_no_verifier() {
        let key = DecodingKey::from_secret(b"secret");
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert!(matches!(
                new_verifier(&alg, &key).err().map(|e| e.into_kind()),
                Some(ErrorKind::UnsupportedAlgorithm)
            ));
        }
    }

    #[test]
    fn a_key_of_another_family_is_refused() {
        let rsa = DecodingKey::from_rsa_raw_components(&[0xc5; 256], &[1, 0, 1]);
        assert!(new_verifier(&Algorithm::ES256, &rsa).is_err());
        let ec = DecodingKey::from_ec_der(&[4; 65]);
        assert!(new_verifier(&Algorithm::RS256, &ec).is_err());
        assert!(new_verifier(&Algorithm::EdDSA, &ec).is_err());
    }

    #[test]
    fn no_signing() {
        let key = EncodingKey::from_secret(b"k");
        assert!(no_signer(&Algorithm::HS256, &key).is_err());
    }
}
