//! Card numbers never reach disk, logs, metrics or errors. At the boundary a number becomes a
//! [`CardKey`] (HMAC-SHA-256 under the server secret) and its last 4 digits; only those travel inward.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::io::Write;
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

pub const CARD_NUMBER_DIGITS_MIN: usize = 12;
pub const CARD_NUMBER_DIGITS_MAX: usize = 19;
pub const SECRET_BYTES: usize = 32;
const SECRET_FILE: &str = "secret.key";

/// A full card number, as received. Debug and Display print only the last 4 digits, so a number
/// that ends up in a log line or a panic message is masked.
#[derive(Clone, PartialEq, Eq)]
pub struct CardNumber(Box<str>);

impl CardNumber {
    pub fn parse(s: &str) -> Option<CardNumber> {
        let ok = (CARD_NUMBER_DIGITS_MIN..=CARD_NUMBER_DIGITS_MAX).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_digit());
        ok.then(|| CardNumber(s.into()))
    }

    pub fn last4(&self) -> [u8; 4] {
        let b = self.0.as_bytes();
        let n = b.len();
        [b[n - 4], b[n - 3], b[n - 2], b[n - 1]]
    }

    /// The full digits; only for the wire encoder and the keyer.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.last4();
        write!(f, "****{}", std::str::from_utf8(&l).unwrap_or("????"))
    }
}

/// The identity of a card at rest and in memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardKey(pub [u8; 32]);

impl fmt::Debug for CardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardKey({})", hex::encode(&self.0[..6]))
    }
}

/// Computes keyed hashes under the server secret. The keyed state is prepared once and cloned per
/// use, which skips re-deriving the HMAC pads on every request.
#[derive(Clone)]
pub struct Keyer {
    card: HmacSha256,
    fingerprint: HmacSha256,
}

impl Keyer {
    pub fn new(secret: &[u8; SECRET_BYTES]) -> Keyer {
        // Two domains under one secret, so a request fingerprint can never equal a card key.
        let mut card = HmacSha256::new_from_slice(secret).expect("hmac accepts any key length");
        card.update(b"giftd card key v1\0");
        let mut fingerprint = HmacSha256::new_from_slice(secret).expect("hmac accepts any key length");
        fingerprint.update(b"giftd request fingerprint v1\0");
        Keyer { card, fingerprint }
    }

    pub fn card_key(&self, number: &CardNumber) -> CardKey {
        let mut m = self.card.clone();
        m.update(number.0.as_bytes());
        CardKey(m.finalize().into_bytes().into())
    }

    /// A keyed digest of a request's content; keyed because the content holds a card number.
    pub fn fingerprint(&self, opcode: u8, body: &[u8]) -> [u8; 16] {
        let mut m = self.fingerprint.clone();
        m.update(&[opcode]);
        m.update(body);
        let full = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }
}

/// Reads the secret from `data_dir/secret.key`, creating it (mode 0600, random) on first start.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<[u8; SECRET_BYTES]> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_secret_hex(text.trim()).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold {} hex-encoded bytes", path.display(), SECRET_BYTES),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; SECRET_BYTES];
            rand::Rng::fill(&mut rand::rngs::OsRng, &mut secret[..]);
            write_secret(&path, &secret)?;
            Ok(secret)
        }
        Err(e) => Err(e),
    }
}

pub fn parse_secret_hex(text: &str) -> Option<[u8; SECRET_BYTES]> {
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

fn write_secret(path: &Path, secret: &[u8; SECRET_BYTES]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(hex::encode(secret).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory entry is synced.
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_validated_and_masked() {
        assert!(CardNumber::parse("12345678901").is_none());
        assert!(CardNumber::parse("12345678901234567890").is_none());
        assert!(CardNumber::parse("1234567890a2").is_none());
        let n = CardNumber::parse("6035719900001234").unwrap();
        assert_eq!(format!("{n} {n:?}"), "****1234 ****1234");
        assert_eq!(&n.last4(), b"1234");
    }

    #[test]
    fn keys_depend_on_secret_and_number() {
        let a = Keyer::new(&[1; 32]);
        let b = Keyer::new(&[2; 32]);
        let n1 = CardNumber::parse("6035719900001234").unwrap();
        let n2 = CardNumber::parse("6035719900001235").unwrap();
        assert_eq!(a.card_key(&n1), a.card_key(&n1));
        assert_ne!(a.card_key(&n1), a.card_key(&n2));
        assert_ne!(a.card_key(&n1), b.card_key(&n1));
    }

    #[test]
    fn secret_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s1 = load_or_create_secret(dir.path()).unwrap();
        let s2 = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(s1, s2);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
