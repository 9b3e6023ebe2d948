//! The local rate limit filter (`envoy.filters.http.local_ratelimit`), as Envoy applies it: a
//! request enabled by `filter_enabled` takes a token from the bucket; without one it is limited,
//! and refused (status 429 by default, body `local_rate_limited`, flag `RL`) when
//! `filter_enforced` takes it, else let through with `request_headers_to_add_when_not_enforced`.
//! A route's `LocalRateLimit` replaces the filter's own, with a bucket of its own; with
//! `local_rate_limit_per_downstream_connection` each connection has its own bucket.
//!
//! Buckets are shared by all workers and lock-free: Envoy's continuous refill, where one atomic
//! holds the moment the bucket was (or would have been) empty and taking a token moves it
//! forward. Stats: `PREFIX.http_local_rate_limit.{enabled,enforced,rate_limited,ok}` under each
//! config's own `stat_prefix`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::header::HeaderName;
use http::{Response, StatusCode};
use remora_config::filters::PerRouteConfig;
use remora_config::filters::local_ratelimit::{LocalRateLimit as Config, TokenBucket};

use super::{filter_reply, most_specific, sampled};
use crate::error::ResponseFlag;
use crate::http::filter::{Flow, HttpFilter, Stream};
use crate::http::headers::number;
use crate::stats::{Registry, Stat};

static LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

const LIMITED_BODY: &str = "local_rate_limited";

/// A token bucket refilled continuously at `tokens_per_fill / fill_interval`, full at first.
#[derive(Debug)]
pub struct Bucket {
    max_tokens: f64,
    /// Tokens per second.
    fill_rate: f64,
    started: Instant,
    /// When, in seconds after `started`, the bucket was empty given what was taken since (an
    /// `f64`'s bits): it holds `min(max, (now - empty_at) * fill_rate)` tokens.
    empty_at: AtomicU64,
}

impl Bucket {
    pub fn new(bucket: &TokenBucket) -> Self {
        let max_tokens = f64::from(bucket.max_tokens);
        let fill_rate = f64::from(bucket.tokens_per_fill) / bucket.fill_interval.as_secs_f64();
        Bucket {
            max_tokens,
            fill_rate,
            started: Instant::now(),
            empty_at: AtomicU64::new((-max_tokens / fill_rate).to_bits()),
        }
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn tokens_at(&self, now: f64, empty_at: f64) -> f64 {
        ((now - empty_at) * self.fill_rate).min(self.max_tokens)
    }

    /// Takes one token, if there is one.
    pub fn take(&self) -> bool {
        let now = self.now();
        let mut current = self.empty_at.load(Ordering::Relaxed);
        loop {
            let tokens = self.tokens_at(now, f64::from_bits(current));
            if tokens < 1.0 {
                return false;
            }
            let empty_at = now - (tokens - 1.0) / self.fill_rate;
            match self.empty_at.compare_exchange_weak(
                current,
                empty_at.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    fn tokens(&self) -> f64 {
        self.tokens_at(
            self.now(),
            f64::from_bits(self.empty_at.load(Ordering::Relaxed)),
        )
    }

    /// `x-ratelimit-reset` as Envoy computes it: 0 while a token is left, else the seconds
    /// (rounded up) until one is back.
    fn reset_seconds(&self) -> u64 {
        let tokens = self.tokens();
        if tokens >= 1.0 {
            return 0;
        }
        ((1.0 - tokens) / self.fill_rate).ceil() as u64
    }
}

/// `PREFIX.http_local_rate_limit.*` of one config.
#[derive(Debug)]
struct LimitStats {
    enabled: Arc<Stat>,
    enforced: Arc<Stat>,
    rate_limited: Arc<Stat>,
    ok: Arc<Stat>,
}

impl LimitStats {
    fn new(registry: &Registry, stat_prefix: &str) -> Self {
        let counter =
            |name: &str| registry.counter(format!("{stat_prefix}.http_local_rate_limit.{name}"));
        // Envoy's descriptor shadow mode counter; Remora refuses descriptors, so it stays 0.
        counter("shadow_mode");
        LimitStats {
            enabled: counter("enabled"),
            enforced: counter("enforced"),
            rate_limited: counter("rate_limited"),
            ok: counter("ok"),
        }
    }
}

/// A config's live part: its shared bucket (none per connection, or without a token bucket)
/// and its stats.
#[derive(Debug)]
struct Limiter {
    bucket: Option<Arc<Bucket>>,
    stats: LimitStats,
}

impl Limiter {
    fn new(config: &Config, registry: &Registry) -> Self {
        Limiter {
            bucket: config
                .token_bucket
                .as_ref()
                .filter(|_| !config.per_connection)
                .map(|bucket| Arc::new(Bucket::new(bucket))),
            stats: LimitStats::new(registry, &config.stat_prefix),
        }
    }
}

/// The filter, under its configured name (its per-route configs' key).
#[derive(Debug)]
pub struct LocalRateLimit {
    name: String,
    config: Arc<Config>,
    limiter: Limiter,
    /// For a route's stats, made when the route is first used.
    registry: Arc<Registry>,
}

impl LocalRateLimit {
    pub fn new(name: &str, config: Arc<Config>, registry: Arc<Registry>) -> Self {
        LocalRateLimit {
            name: name.to_string(),
            limiter: Limiter::new(&config, &registry),
            config,
            registry,
        }
    }
}

/// The bucket a request drew from, kept for the response's `x-ratelimit-*` headers.
struct Drawn(Arc<Bucket>);

impl HttpFilter for LocalRateLimit {
    fn on_request(&self, stream: &mut Stream<'_>) -> Flow {
        let route_config = most_specific(stream, &self.name, |config| match config {
            PerRouteConfig::LocalRateLimit(config) => Some(config),
            _ => None,
        });
        let (config, limiter): (&Config, &Limiter) = match route_config {
            Some(config) => {
                let limiter = config
                    .live
                    .get_or_init(|| Limiter::new(config, &self.registry));
                match limiter {
                    Some(limiter) => (config, limiter),
                    None => return Flow::Continue,
                }
            }
            None => (&self.config, &self.limiter),
        };
        if !sampled(config.enabled_per_million) {
            return Flow::Continue;
        }
        limiter.stats.enabled.inc();
        let bucket = if config.per_connection {
            // As Envoy: the connection's bucket is made from the config of its first request.
            stream
                .connection_state(|| {
                    config
                        .token_bucket
                        .as_ref()
                        .map(|b| Arc::new(Bucket::new(b)))
                })
                .and_then(Option::clone)
        } else {
            limiter.bucket.clone()
        };
        let allowed = bucket.as_ref().is_none_or(|bucket| bucket.take());
        if config.x_ratelimit_headers
            && let Some(bucket) = &bucket
        {
            stream.set_state(Drawn(bucket.clone()));
        }
        if allowed {
            limiter.stats.ok.inc();
            return Flow::Continue;
        }
        limiter.stats.rate_limited.inc();
        if !sampled(config.enforced_per_million) {
            config
                .request_headers_when_not_enforced
                .apply(&mut stream.request.headers);
            return Flow::Continue;
        }
        limiter.stats.enforced.inc();
        let status = StatusCode::from_u16(config.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        let mut reply = filter_reply(
            status,
            (LIMITED_BODY, "local_rate_limited"),
            ResponseFlag::RateLimited,
            config.grpc_resource_exhausted.then_some(8),
        );
        config.response_headers.apply(&mut reply.headers);
        Flow::Reply(reply)
    }

    fn on_response(&self, stream: &mut Stream<'_>, response: &mut Response<()>) {
        let Some(Drawn(bucket)) = stream.state::<Drawn>() else {
            return;
        };
        let headers = response.headers_mut();
        headers.append(&LIMIT, number(bucket.max_tokens as u64));
        headers.append(&REMAINING, number(bucket.tokens().max(0.0) as u64));
        headers.append(&RESET, number(bucket.reset_seconds()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_gives_max_tokens_then_refuses_until_refilled() {
        let bucket = Bucket::new(&TokenBucket {
            max_tokens: 3,
            tokens_per_fill: 1,
            fill_interval: Duration::from_secs(3600),
        });
        assert_eq!(bucket.reset_seconds(), 0);
        assert!((0..3).all(|_| bucket.take()));
        assert!(!bucket.take());
        assert_eq!(bucket.tokens() as u64, 0);
        assert_eq!(bucket.reset_seconds(), 3600);
        // Pretend the refill time passed: one token back.
        let empty_at = f64::from_bits(bucket.empty_at.load(Ordering::Relaxed));
        bucket
            .empty_at
            .store((empty_at - 3600.0).to_bits(), Ordering::Relaxed);
        assert!(bucket.take());
        assert!(!bucket.take());
    }

    #[test]
    fn a_bucket_shared_by_threads_gives_exactly_its_tokens() {
        let bucket = Arc::new(Bucket::new(&TokenBucket {
            max_tokens: 1000,
            tokens_per_fill: 1,
            fill_interval: Duration::from_secs(3600),
        }));
        let taken: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let bucket = bucket.clone();
                    scope.spawn(move || (0..500).filter(|_| bucket.take()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 1000);
    }
}
