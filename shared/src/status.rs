//! The status vocabulary users and scripts read: workspace status, agent lifecycle, span status.
//! The lowercase words are part of the public surface (CLI, JSON API, database) and never change.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! words {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        impl FromStr for $name {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(UnknownWord {
                        kind: stringify!($name),
                        word: s.chars().take(64).collect(),
                        expected: vec![$($word),+].join(", "),
                    }),
                }
            }
        }
    };
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown {} '{word}' (expected one of: {expected})", in_words(kind))]
pub struct UnknownWord {
    kind: &'static str,
    word: String,
    expected: String,
}

/// `WorkspaceStatus` as "workspace status", for messages users read.
fn in_words(kind: &str) -> String {
    let mut out = String::with_capacity(kind.len() + 4);
    for (i, c) in kind.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

words!(
    /// Where a workspace is, as users see it.
    WorkspaceStatus {
        Pending => "pending",
        Starting => "starting",
        Running => "running",
        Unhealthy => "unhealthy",
        Stopping => "stopping",
        Stopped => "stopped",
        Failed => "failed",
        Deleting => "deleting",
        Deleted => "deleted",
    }
);

words!(
    /// What the agent reports about its own start and shutdown. Ordered: it never goes backwards
    /// within one build.
    Lifecycle {
        Created => "created",
        Starting => "starting",
        Ready => "ready",
        StartError => "start_error",
        StartTimeout => "start_timeout",
        ShuttingDown => "shutting_down",
        Off => "off",
        ShutdownError => "shutdown_error",
        ShutdownTimeout => "shutdown_timeout",
    }
);

words!(
    /// How one timed step ended.
    SpanStatus {
        Ok => "ok",
        ExitFailure => "exit_failure",
        TimedOut => "timed_out",
        Error => "error",
        // A provisioning command that a stop or delete overtook and ended.
        Cancelled => "cancelled",
    }
);

impl Lifecycle {
    /// Position in the one-way order created → starting → (ready | start_error | start_timeout) →
    /// shutting_down → (off | shutdown_error | shutdown_timeout).
    pub fn rank(self) -> u8 {
        match self {
            Lifecycle::Created => 0,
            Lifecycle::Starting => 1,
            Lifecycle::Ready | Lifecycle::StartError | Lifecycle::StartTimeout => 2,
            Lifecycle::ShuttingDown => 3,
            Lifecycle::Off | Lifecycle::ShutdownError | Lifecycle::ShutdownTimeout => 4,
        }
    }

    /// True when `next` may follow `self`: strictly later in the order.
    pub fn may_advance_to(self, next: Lifecycle) -> bool {
        next.rank() > self.rank()
    }

    /// The start scripts have finished, one way or another.
    pub fn start_finished(self) -> bool {
        self.rank() >= 2
    }

    /// The agent has begun its shutdown (its stop scripts), or finished it.
    pub fn shutdown_begun(self) -> bool {
        self.rank() >= Lifecycle::ShuttingDown.rank()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        for s in WorkspaceStatus::ALL {
            assert_eq!(s.as_str().parse::<WorkspaceStatus>().unwrap(), *s);
        }
        for s in Lifecycle::ALL {
            assert_eq!(s.as_str().parse::<Lifecycle>().unwrap(), *s);
        }
        let err = "runing".parse::<WorkspaceStatus>().unwrap_err().to_string();
        assert!(
            err.starts_with("unknown workspace status 'runing' (expected one of: pending, starting, running,"),
            "{err}"
        );
    }

    #[test]
    fn lifecycle_never_goes_backwards() {
        assert!(Lifecycle::Created.may_advance_to(Lifecycle::Starting));
        assert!(Lifecycle::Starting.may_advance_to(Lifecycle::StartError));
        assert!(!Lifecycle::Ready.may_advance_to(Lifecycle::StartError));
        assert!(!Lifecycle::Ready.may_advance_to(Lifecycle::Starting));
        assert!(Lifecycle::Ready.may_advance_to(Lifecycle::ShuttingDown));
        assert!(!Lifecycle::Off.may_advance_to(Lifecycle::Ready));
    }

    #[test]
    fn json_uses_lowercase_words() {
        assert_eq!(serde_json::to_string(&Lifecycle::StartTimeout).unwrap(), "\"start_timeout\"");
        assert_eq!(serde_json::to_string(&WorkspaceStatus::Unhealthy).unwrap(), "\"unhealthy\"");
    }
}
