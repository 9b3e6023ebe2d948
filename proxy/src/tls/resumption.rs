//! Session resumption for the TLS a cluster originates. rustls's own client cache keeps eight
//! TLS 1.3 tickets per server, and a ticket serves one handshake; a pool opening tens of
//! connections at once to one sidecar ran out of them, and three handshakes in four were full
//! ones (Envoy's client, speaking TLS 1.2, resumed all of them). This cache keeps enough
//! tickets for a busy pool. `max_session_keys: 0` turns resumption off, as in Envoy.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;

/// TLS 1.3 tickets kept per server name (each serves one handshake; servers send two).
const TICKETS_PER_SERVER: usize = 256;
/// Server names remembered; a cluster talks to few (its SNI, or each host's address).
const SERVERS: usize = 256;

#[derive(Debug, Default)]
struct Remembered {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    tls13: VecDeque<Tls13ClientSessionValue>,
}

/// One cluster's resumable sessions, by server name.
#[derive(Debug, Default)]
pub struct SessionCache {
    servers: Mutex<HashMap<ServerName<'static>, Remembered>>,
}

impl SessionCache {
    fn edit<T>(&self, name: &ServerName<'_>, change: impl FnOnce(&mut Remembered) -> T) -> T {
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if !servers.contains_key(name) && servers.len() >= SERVERS {
            // Forget one at random rather than track ages: a rare event, and only costs a
            // full handshake.
            if let Some(forgotten) = servers.keys().next().cloned() {
                servers.remove(&forgotten);
            }
        }
        change(servers.entry(name.to_owned()).or_default())
    }

    fn read<T>(&self, name: &ServerName<'_>, look: impl FnOnce(&Remembered) -> T) -> Option<T> {
        let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        servers.get(name).map(look)
    }
}

impl ClientSessionStore for SessionCache {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.edit(&name, |r| r.kx_hint = Some(group));
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.read(name, |r| r.kx_hint).flatten()
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.edit(&name, |r| r.tls12 = Some(value));
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.read(name, |r| r.tls12.clone()).flatten()
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.edit(name, |r| r.tls12 = None);
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.edit(&name, |r| {
            if r.tls13.len() >= TICKETS_PER_SERVER {
                r.tls13.pop_front();
            }
            r.tls13.push_back(value);
        });
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.edit(name, |r| r.tls13.pop_back())
    }
}
