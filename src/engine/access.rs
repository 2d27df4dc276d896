//! Who may do what. Every client has a role, and a merchant or reseller is bound to its merchant id.
//! Which operations a role allows is a business rule like any other, so it lives here. The server
//! names each request's [`Action`] and asks.

/// A client's role, as the config file names it and the `auth` reply numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Head office, back office and support: every operation, every merchant's events.
    Operator = 1,
    /// A payment processor acting for many merchants: payments, loads and activations, no
    /// back-office operation and no event stream.
    Processor = 2,
    /// One merchant's POS or e-commerce back end: what a processor may do, only under its own
    /// merchant id, and its own traffic's events.
    Merchant = 3,
    /// A reseller: issues and activates cards (one at a time or in bulk jobs) under its own
    /// merchant id, and follows its own events.
    Reseller = 4,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Operator, Role::Processor, Role::Merchant, Role::Reseller];

    pub fn name(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Processor => "processor",
            Role::Merchant => "merchant",
            Role::Reseller => "reseller",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    pub fn from_u8(v: u8) -> Option<Role> {
        Role::ALL.into_iter().find(|r| *r as u8 == v)
    }

    /// Whether clients of this role act for one merchant id (and must be configured with it).
    pub fn bound_to_merchant(self) -> bool {
        matches!(self, Role::Merchant | Role::Reseller)
    }

    /// Whether this role may do `action`.
    pub fn may(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Operator => true,
            Role::Processor => matches!(action, Balance | Pay | Load | Activate),
            Role::Merchant => matches!(action, Balance | Pay | Load | Activate | Subscribe),
            Role::Reseller => matches!(action, Balance | Load | Activate | Issue | Bulk | Subscribe),
        }
    }
}

/// What a request does, in the terms roles are granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A balance inquiry.
    Balance,
    /// A support read: lookup, history, a program's settings.
    Inspect,
    /// Spending and what undoes it: redeem, authorize, capture, void, refund, reverse, split
    /// redeem, cash-out, and the customer's PIN at the till (set, verify).
    Pay,
    /// A reload.
    Load,
    /// An activation (at the till, or by a reseller).
    Activate,
    /// Issuing a card.
    Issue,
    /// Bulk jobs: open, send chunks (issue, activate, reverse), read a job.
    Bulk,
    /// Back-office card operations: lock, unlock, note, reactivate, PIN reset, register, transfer.
    CardAdmin,
    /// Changing a program's settings.
    ProgramAdmin,
    /// Following the event stream.
    Subscribe,
}

/// An authenticated client, or the anonymous operator every connection is when no client is
/// configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// The merchant id a merchant or reseller acts under; None for operators and processors.
    pub merchant: Option<String>,
}

impl Principal {
    /// Every connection of a giftd with no configured clients.
    pub fn anonymous_operator() -> Principal {
        Principal { name: String::new(), role: Role::Operator, merchant: None }
    }

    pub fn may(&self, action: Action) -> bool {
        self.role.may(action)
    }

    /// Whether this client may act under `merchant` (the merchant id a request carries): a bound
    /// client only under its own.
    pub fn may_act_for(&self, merchant: &str) -> bool {
        self.merchant.as_deref().is_none_or(|own| own == merchant)
    }

    /// The merchant filter a subscription of this client gets, given the one it asked for (empty
    /// for all): a bound client sees only its own merchant's events. None when it asked for
    /// another merchant's.
    pub fn subscription_merchant<'a>(&'a self, asked: &'a str) -> Option<&'a str> {
        match self.merchant.as_deref() {
            None => Some(asked),
            Some(own) if asked.is_empty() || asked == own => Some(own),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    const ALL_ACTIONS: [Action; 10] =
        [Balance, Inspect, Pay, Load, Activate, Issue, Bulk, CardAdmin, ProgramAdmin, Subscribe];

    #[test]
    fn each_role_is_granted_exactly_its_actions() {
        let granted = |role: Role| ALL_ACTIONS.into_iter().filter(|a| role.may(*a)).collect::<Vec<_>>();
        assert_eq!(granted(Role::Operator), ALL_ACTIONS.to_vec());
        assert_eq!(granted(Role::Processor), vec![Balance, Pay, Load, Activate]);
        assert_eq!(granted(Role::Merchant), vec![Balance, Pay, Load, Activate, Subscribe]);
        assert_eq!(granted(Role::Reseller), vec![Balance, Load, Activate, Issue, Bulk, Subscribe]);
    }

    #[test]
    fn back_office_is_closed_to_tills_and_resellers() {
        for role in [Role::Processor, Role::Merchant, Role::Reseller] {
            for a in [Inspect, CardAdmin, ProgramAdmin] {
                assert!(!role.may(a), "{} may {a:?}", role.name());
            }
        }
    }

    #[test]
    fn bound_clients_act_and_subscribe_only_for_their_merchant() {
        let m = Principal { name: "pos-1".into(), role: Role::Merchant, merchant: Some("m-1".into()) };
        assert!(m.may_act_for("m-1"));
        assert!(!m.may_act_for("m-2"));
        assert_eq!(m.subscription_merchant(""), Some("m-1"));
        assert_eq!(m.subscription_merchant("m-1"), Some("m-1"));
        assert_eq!(m.subscription_merchant("m-2"), None);
        let op = Principal::anonymous_operator();
        assert!(op.may_act_for("anyone"));
        assert_eq!(op.subscription_merchant(""), Some(""));
        assert_eq!(op.subscription_merchant("m-2"), Some("m-2"));
    }

    #[test]
    fn role_names_and_numbers_round_trip() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.name()), Some(r));
            assert_eq!(Role::from_u8(r as u8), Some(r));
        }
        assert_eq!(Role::parse("admin"), None);
        assert_eq!(Role::from_u8(0), None);
    }
}
