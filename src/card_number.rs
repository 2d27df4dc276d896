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
pub const SECRET_FILE: &str = "secret.key";
/// The PIN key lives in its own file: a leak of the card-number key alone must not let anyone
/// test PINs offline, nor the other way round.
pub const PIN_SECRET_FILE: &str = "pin.key";
pub const PIN_DIGITS_MIN: usize = 4;
pub const PIN_DIGITS_MAX: usize = 12;

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

    /// Whether the last digit is the Luhn check digit of the others.
    pub fn luhn_ok(&self) -> bool {
        let (body, check) = self.0.split_at(self.0.len() - 1);
        luhn_check_digit(body) == check.as_bytes()[0]
    }

    /// A random number of `length` digits: `prefix`, random digits, then the Luhn check digit.
    /// The caller checks `prefix.len() + 1 < length` (program validation keeps 9 random digits).
    pub fn generate(prefix: &str, length: usize, rng: &mut impl rand::Rng) -> CardNumber {
        let mut s = String::with_capacity(length);
        s.push_str(prefix);
        while s.len() + 1 < length {
            s.push(char::from(b'0' + rng.gen_range(0..10u8)));
        }
        let check = luhn_check_digit(&s);
        s.push(char::from(check));
        CardNumber(s.into())
    }
}

/// The Luhn check digit (as an ASCII digit) that completes `body`, a string of ASCII digits.
pub fn luhn_check_digit(body: &str) -> u8 {
    // From the right, every other digit starting with the one next to the check digit is doubled.
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    b'0' + ((10 - sum % 10) % 10) as u8
}

/// A PIN as received: digits only. Debug and Display never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Pin(Box<str>);

impl Pin {
    pub fn parse(s: &str) -> Option<Pin> {
        let ok = (PIN_DIGITS_MIN..=PIN_DIGITS_MAX).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
        ok.then(|| Pin(s.into()))
    }

    /// The digits; only for the wire encoder and the PIN keyer.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(****)")
    }
}

/// What giftd keeps of a PIN: a keyed hash of it and the card it belongs to, under the PIN key.
/// Equal PINs on two cards give different values, and without the key no value can be tested.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PinProof(pub [u8; 16]);

impl PinProof {
    /// Constant-time equality, so a wrong PIN's timing says nothing of how close it was.
    pub fn matches(&self, other: &PinProof) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}

impl fmt::Debug for PinProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinProof(..)")
    }
}

/// Computes PIN proofs under the PIN key (a secret separate from the card-number key).
#[derive(Clone)]
pub struct PinKeyer {
    mac: HmacSha256,
}

impl PinKeyer {
    pub fn new(secret: &[u8; SECRET_BYTES]) -> PinKeyer {
        let mut mac = HmacSha256::new_from_slice(secret).expect("hmac accepts any key length");
        mac.update(b"giftd pin v1\0");
        PinKeyer { mac }
    }

    pub fn proof(&self, card: &CardKey, pin: &Pin) -> PinProof {
        let mut m = self.mac.clone();
        m.update(&card.0);
        m.update(pin.0.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&m.finalize().into_bytes()[..16]);
        PinProof(out)
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

/// The identity of a card at rest and in memory. Ordered as its bytes are (the lock order, and the
/// card table's).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CardKey(pub [u8; 32]);

/// Byte order, eight bytes at a time: uniform keys almost always differ in their first eight, and
/// sorting and searching a batch's thousands of cards by a 32-byte `memcmp` call each time was 6 %
/// of its CPU.
impl Ord for CardKey {
    fn cmp(&self, other: &CardKey) -> std::cmp::Ordering {
        let head = |k: &CardKey| u64::from_be_bytes(k.0[..8].try_into().expect("eight bytes"));
        head(self).cmp(&head(other)).then_with(|| self.0[8..].cmp(&other.0[8..]))
    }
}

impl PartialOrd for CardKey {
    fn partial_cmp(&self, other: &CardKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A card key is an HMAC under the server secret: its bytes are already uniform, and no client can
/// choose keys that collide without the secret. So its first eight bytes are its hash, and maps of
/// cards skip SipHash, which was a visible share of a bulk job's profile.
impl std::hash::Hash for CardKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.prefix())
    }
}

impl CardKey {
    /// The key's first eight bytes as a number: its hash, and its shard in sharded maps.
    pub fn prefix(&self) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

/// The hasher for maps keyed by [`CardKey`]: passes the key's own hash through.
#[derive(Default)]
pub struct CardKeyHasher(u64);

impl std::hash::Hasher for CardKeyHasher {
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }

    /// Only card keys are hashed with this; any other bytes still get a usable (FNV-1a) hash.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Build state for card maps: `HashMap<CardKey, V, CardKeyState>`.
pub type CardKeyState = std::hash::BuildHasherDefault<CardKeyHasher>;

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

/// Reads a secret from `data_dir/file`, creating it (mode 0600, random) on first start.
pub fn load_or_create_secret(data_dir: &Path, file: &str) -> std::io::Result<[u8; SECRET_BYTES]> {
    let path = data_dir.join(file);
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
    use std::hash::BuildHasher;

    /// Keys order as their bytes do (the card table is sorted by its byte keys, and locks are taken
    /// in this order), keys that share their first eight bytes included.
    #[test]
    fn card_keys_order_as_their_bytes() {
        let keyer = Keyer::new(&[5; 32]);
        let mut keys: Vec<CardKey> =
            (0..2_000u64).map(|i| keyer.card_key(&CardNumber::parse(&format!("60357300{i:08}")).unwrap())).collect();
        // Keys that differ only after their first eight bytes, or only in their last.
        let mut twin = keys[0];
        twin.0[20] ^= 0x80;
        let mut last = keys[1];
        last.0[31] ^= 1;
        keys.extend([twin, last]);
        let mut by_bytes = keys.clone();
        by_bytes.sort_unstable_by_key(|k| k.0);
        keys.sort_unstable();
        assert_eq!(keys, by_bytes);
        for w in keys.windows(2) {
            assert_eq!(w[0].cmp(&w[1]), w[0].0.cmp(&w[1].0));
            assert_eq!(w[1].cmp(&w[0]), w[1].0.cmp(&w[0].0));
        }
        assert_eq!(twin.cmp(&twin), std::cmp::Ordering::Equal);
    }

    /// Card maps hash a key by its own bytes: consecutive numbers (a bulk range) must still spread
    /// over the buckets (low bits) and the control bytes (high bits) of a hash table.
    #[test]
    fn card_keys_hash_uniformly_by_their_own_bytes() {
        let keyer = Keyer::new(&[3; 32]);
        let state = CardKeyState::default();
        let hashes: Vec<u64> = (0..16_384u64)
            .map(|i| state.hash_one(keyer.card_key(&CardNumber::parse(&format!("60357300{i:08}")).unwrap())))
            .collect();
        let key = keyer.card_key(&CardNumber::parse("6035730000000000").unwrap());
        assert_eq!(hashes[0], key.prefix());
        for bits in [hashes.iter().map(|h| h & 0xff).collect::<Vec<_>>(), hashes.iter().map(|h| h >> 56).collect()] {
            let mut buckets = [0u32; 256];
            bits.iter().for_each(|b| buckets[*b as usize] += 1);
            // 64 expected per bucket; a skewed hash would leave buckets empty or crowded.
            assert!(buckets.iter().all(|n| (24..=112).contains(n)), "{buckets:?}");
        }
    }

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
    fn luhn_digits_are_checked_and_generated() {
        // 79927398713 is the textbook example; 4111 1111 1111 1111 a well-known test number.
        assert_eq!(luhn_check_digit("7992739871"), b'3');
        assert!(CardNumber::parse("4111111111111111").unwrap().luhn_ok());
        assert!(!CardNumber::parse("4111111111111112").unwrap().luhn_ok());
        let mut rng = rand::rngs::OsRng;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let n = CardNumber::generate("603571", 16, &mut rng);
            assert!(n.expose().starts_with("603571") && n.expose().len() == 16 && n.luhn_ok(), "{n}");
            seen.insert(n.expose().to_string());
        }
        assert!(seen.len() > 190, "generated numbers must not repeat: {} distinct", seen.len());
    }

    #[test]
    fn pin_proofs_are_keyed_per_card_and_masked() {
        let k = PinKeyer::new(&[7; 32]);
        let (c1, c2) = (CardKey([1; 32]), CardKey([2; 32]));
        let pin = Pin::parse("1234").unwrap();
        assert!(k.proof(&c1, &pin).matches(&k.proof(&c1, &pin)));
        assert!(!k.proof(&c1, &pin).matches(&k.proof(&c2, &pin)));
        assert!(!k.proof(&c1, &pin).matches(&k.proof(&c1, &Pin::parse("1235").unwrap())));
        assert!(!PinKeyer::new(&[8; 32]).proof(&c1, &pin).matches(&k.proof(&c1, &pin)));
        assert_eq!(format!("{pin:?} {:?}", k.proof(&c1, &pin)), "Pin(****) PinProof(..)");
        assert!(Pin::parse("123").is_none() && Pin::parse("12a4").is_none() && Pin::parse("1234567890123").is_none());
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
        let s1 = load_or_create_secret(dir.path(), SECRET_FILE).unwrap();
        let s2 = load_or_create_secret(dir.path(), SECRET_FILE).unwrap();
        assert_eq!(s1, s2);
        let p = load_or_create_secret(dir.path(), PIN_SECRET_FILE).unwrap();
        assert_ne!(s1, p, "the PIN key is a second, independent secret");
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
