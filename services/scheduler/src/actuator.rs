//! Where idle-resource and budget actions go. [`DryRun`] only logs and
//! records; [`crate::gce::Gce`] stops, resizes and starts the Compute Engine
//! instances costmesh may manage.
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use costmesh_contracts::v1::{Action, ActionState};

/// What an actuator did with an action.
#[derive(Clone, Debug, PartialEq)]
pub struct Acted {
    pub state: ActionState,
    /// True when nothing outside costmesh was changed.
    pub dry_run: bool,
    /// What happened, or what would be done.
    pub outcome: String,
    /// Cloud operations that carried it out, in order.
    pub operations: Vec<String>,
    /// The cloud resource acted on, if any.
    pub resource: String,
}

impl Acted {
    pub fn proposed(outcome: impl Into<String>) -> Self {
        Self {
            state: ActionState::Proposed,
            dry_run: true,
            outcome: outcome.into(),
            operations: Vec::new(),
            resource: String::new(),
        }
    }

    /// Copies the outcome into `action`.
    pub fn apply_to(self, action: &mut Action) {
        action.state = self.state as i32;
        action.dry_run = self.dry_run;
        action.outcome = self.outcome;
        action.operations = self.operations;
        action.resource = self.resource;
    }
}

/// Boxed future an actuator returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Actuator: Send + Sync + 'static {
    /// Carries out (or, dry run, records) `action`, whose target is a node.
    fn act<'a>(&'a self, action: &'a Action) -> BoxFuture<'a, Acted>;
    /// True when nothing is changed outside costmesh.
    fn dry_run(&self) -> bool;
    /// A budget that gates cloud work is exceeded: whatever the actuator
    /// does about it (stopping the cloud machines it manages), one action
    /// each. `template` carries kind, reason, service and time.
    fn budget_exceeded<'a>(&'a self, template: &'a Action) -> BoxFuture<'a, Vec<Action>> {
        let _ = template;
        Box::pin(async { Vec::new() })
    }
}

/// Logs and records every action; changes nothing.
#[derive(Clone, Default)]
pub struct DryRun {
    pub taken: Arc<Mutex<Vec<Action>>>,
}

impl Actuator for DryRun {
    fn act<'a>(&'a self, action: &'a Action) -> BoxFuture<'a, Acted> {
        Box::pin(async move {
            tracing::warn!(kind = %action.kind, target = %action.target, reason = %action.reason, "idle action (dry run: recorded, nothing changed)");
            self.taken.lock().expect("actuator lock").push(action.clone());
            Acted::proposed(format!(
                "dry run: {} {} recorded; no cloud actuator is configured",
                action.kind, action.target
            ))
        })
    }

    fn dry_run(&self) -> bool {
        true
    }
}
