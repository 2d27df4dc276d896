//! Who a connection is and how fast it may go: the configured clients and their keys, each
//! connection's authentication (an HMAC of its hello nonce under the client's key), and the request
//! rates of clients and connections. What a role may do is the engine's rule (`engine::access`);
//! this module only names each operation's action and asks.

use crate::config::ClientConfig;
use crate::engine::access::{Action, Principal, Role};
use crate::model::ResultCode;
use crate::wire::{self, Opcode, Request, AUTH_NONCE_BYTES};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

type HmacSha256 = Hmac<sha2::Sha256>;

/// A configured client.
pub struct Client {
    pub principal: Principal,
    key: [u8; 32],
    /// Shared by all the client's connections.
    limiter: Option<DefaultDirectRateLimiter>,
}

/// Every client giftd knows, and the per-connection rate.
pub struct Access {
    clients: HashMap<String, Arc<Client>>,
    /// Every connection's principal when no client is configured.
    anonymous: Option<Arc<Client>>,
    connection_rps: u32,
}

/// A rate of `per_second` requests with bursts of one second's worth; None for 0 (no limit).
fn limiter(per_second: u32) -> Option<DefaultDirectRateLimiter> {
    NonZeroU32::new(per_second).map(|n| RateLimiter::direct(Quota::per_second(n)))
}

impl Access {
    /// The client table from the configuration (already validated, keys readable).
    pub fn new(clients: &[ClientConfig], connection_rps: u32) -> anyhow::Result<Access> {
        let mut table = HashMap::with_capacity(clients.len());
        for c in clients {
            let role = Role::parse(&c.role).ok_or_else(|| anyhow::anyhow!("client {:?}: bad role", c.name))?;
            let key = c.key().map_err(|e| anyhow::anyhow!("client {:?}: {e}", c.name))?;
            let principal = Principal { name: c.name.clone(), role, merchant: c.merchant.clone() };
            table.insert(c.name.clone(), Arc::new(Client { principal, key, limiter: limiter(c.requests_per_second) }));
        }
        let anonymous = table
            .is_empty()
            .then(|| Arc::new(Client { principal: Principal::anonymous_operator(), key: [0; 32], limiter: None }));
        Ok(Access { clients: table, anonymous, connection_rps })
    }

    /// Whether connections must authenticate.
    pub fn required(&self) -> bool {
        self.anonymous.is_none()
    }
}

/// Which rate refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Client,
    Connection,
}

/// One connection's identity and rate.
pub struct Gate {
    pub nonce: [u8; AUTH_NONCE_BYTES],
    client: Option<Arc<Client>>,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Gate {
    pub fn new(access: &Access) -> Gate {
        let mut nonce = [0; AUTH_NONCE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        Gate { nonce, client: access.anonymous.clone(), limiter: limiter(access.connection_rps) }
    }

    pub fn principal(&self) -> Option<&Principal> {
        self.client.as_deref().map(|c| &c.principal)
    }

    /// Checks `proof` against the named client's key; on success the connection is that client
    /// (a second auth may switch clients). An unknown client and a wrong proof are refused alike,
    /// after the same work, so a refusal does not tell which names exist.
    pub fn authenticate(&mut self, access: &Access, client: &str, proof: &[u8; 32]) -> Option<&Principal> {
        let found = access.clients.get(client);
        let key = found.map_or(&[0u8; 32], |c| &c.key);
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(&wire::auth_message(&self.nonce, client));
        let ok = mac.verify_slice(proof).is_ok();
        match found {
            Some(c) if ok => {
                self.client = Some(c.clone());
                self.principal()
            }
            _ => None,
        }
    }

    /// Why an operation is refused before its body is read: the connection has not authenticated,
    /// or its role does not allow it. The handshake and `auth` pass, and so does a batch from an
    /// authenticated client: its items are judged one by one.
    pub fn refuse_op(&self, op: Opcode) -> Option<ResultCode> {
        if matches!(op, Opcode::Hello | Opcode::Auth) {
            return None;
        }
        let Some(p) = self.principal() else { return Some(ResultCode::Unauthenticated) };
        action(op).filter(|a| !p.may(*a)).map(|_| ResultCode::Forbidden)
    }

    /// Why a decoded request is refused: it names another merchant than the client's own.
    pub fn refuse_request(&self, req: &Request) -> Option<ResultCode> {
        let p = self.principal()?;
        req.merchant().filter(|m| !p.may_act_for(m)).map(|_| ResultCode::Forbidden)
    }

    /// Takes `cost` requests from the connection's rate, then the client's. A cost larger than a
    /// second's worth never passes. The connection's comes first so that what one connection
    /// sends beyond its own rate does not use up the allowance its client's other connections
    /// share.
    pub fn admit(&self, cost: usize) -> Result<(), Scope> {
        let n = NonZeroU32::new(cost.clamp(1, u32::MAX as usize) as u32).expect("at least 1");
        let take = |l: Option<&DefaultDirectRateLimiter>| l.is_none_or(|l| matches!(l.check_n(n), Ok(Ok(()))));
        if !take(self.limiter.as_ref()) {
            return Err(Scope::Connection);
        }
        if !take(self.client.as_ref().and_then(|c| c.limiter.as_ref())) {
            return Err(Scope::Client);
        }
        Ok(())
    }
}

/// What each operation does, in the terms roles are granted. None: the handshake and `auth`,
/// open to all, and a batch, whose items are judged one by one (once its client is known).
pub fn action(op: Opcode) -> Option<Action> {
    Some(match op {
        Opcode::Hello | Opcode::Auth | Opcode::Batch => return None,
        Opcode::Balance => Action::Balance,
        Opcode::Lookup | Opcode::History | Opcode::ProgramGet => Action::Inspect,
        Opcode::Redeem
        | Opcode::Authorize
        | Opcode::Capture
        | Opcode::Void
        | Opcode::Refund
        | Opcode::Reverse
        | Opcode::SplitRedeem
        | Opcode::CashOut
        | Opcode::PinSet
        | Opcode::PinVerify => Action::Pay,
        Opcode::Reload => Action::Load,
        Opcode::Activate => Action::Activate,
        Opcode::Issue => Action::Issue,
        Opcode::JobOpen | Opcode::JobChunk | Opcode::JobGet => Action::Bulk,
        Opcode::Lock
        | Opcode::Unlock
        | Opcode::Note
        | Opcode::Reactivate
        | Opcode::PinReset
        | Opcode::Register
        | Opcode::Transfer => Action::CardAdmin,
        Opcode::ProgramSet => Action::ProgramAdmin,
        Opcode::Subscribe => Action::Subscribe,
    })
}
