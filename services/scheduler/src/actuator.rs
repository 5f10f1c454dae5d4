//! Where idle-resource actions go. The shipped actuator only logs and
//! records (dry run); a cloud actuator (say, resizing a GCE managed
//! instance group or stopping a VM) implements the same trait.
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use costmesh_contracts::v1::{Action, ActionState};

/// What an actuator did with an action.
pub type ActResult = Result<ActionState, String>;

pub trait Actuator: Send + Sync + 'static {
    /// Carries out (or, dry run, records) `action`.
    fn act<'a>(&'a self, action: &'a Action) -> Pin<Box<dyn Future<Output = ActResult> + Send + 'a>>;
    /// True when nothing is changed outside costmesh.
    fn dry_run(&self) -> bool;
}

/// Logs and records every action; changes nothing.
#[derive(Clone, Default)]
pub struct DryRun {
    pub taken: Arc<Mutex<Vec<Action>>>,
}

impl Actuator for DryRun {
    fn act<'a>(&'a self, action: &'a Action) -> Pin<Box<dyn Future<Output = ActResult> + Send + 'a>> {
        Box::pin(async move {
            tracing::warn!(kind = %action.kind, target = %action.target, reason = %action.reason, "idle action (dry run: recorded, nothing changed)");
            self.taken.lock().expect("actuator lock").push(action.clone());
            Ok(ActionState::Proposed)
        })
    }

    fn dry_run(&self) -> bool {
        true
    }
}
