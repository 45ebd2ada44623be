//! The wave controller: moves every fleet-wide `Rollout` across its instances wave by wave.
//!
//! [`plan`] decides (pure, no I/O): from a Rollout's spec and status and what each of its
//! instances shows (`status.rollout` and `status.configRevision`), it returns the Rollout's new
//! status and the [`Step`]s to take. [`reconcile_once`] reads the store, plans every Rollout and
//! writes; [`run`] repeats that on every store change and on a timer (bake times end without a
//! write).
//!
//! Rules:
//! - Instances are split into cumulative waves ([`crate::model::wave_sizes`]), in the order the
//!   Rollout lists them. A wave is released all at once: a system Rollout clears the hold
//!   (`status.rollout.heldBy`) it set on each instance, a user's Rollout writes its version or
//!   image into each instance's spec (remembering what it had), which makes a new revision.
//! - An instance has succeeded when its own update reports `Succeeded` for the revision the
//!   Rollout moves it to; it has failed when that update reports `Failed` or `RolledBack`.
//! - The first failed instance halts the whole Rollout (`Halted`, naming the instance and its
//!   update's message): later waves stay held on their old revision, untouched.
//! - Once every instance of a wave has succeeded (or was superseded or deleted), the next wave
//!   waits `spec.bakeTime`; after the last wave the Rollout has `Succeeded`.
//! - `spec.paused` keeps the next wave from starting; updates already released go on.
//! - A newer change to an instance takes its hold over (the hold then names the newer Rollout);
//!   the older Rollout records that instance as `Superseded` and counts it as done, so nothing
//!   stays held by a Rollout that no longer moves it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::{
    InstanceRef, Kind, ObjectKey, Resource, Rollout, RolloutPhase, RolloutSpec, WaveCounts,
    WaveInstance, WaveInstanceState, WavePhase, WaveStatus, wave_sizes,
};
use crate::store::{ChangeNote, ListFilter, Store, StoreError, WriteMode};
use crate::util::rfc3339;

/// How often Rollouts are looked at without a store change (bake times end on this tick).
pub const RESYNC: Duration = Duration::from_secs(5);

/// What one instance of a Rollout shows now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub held_by: Option<String>,
    /// `status.rollout.phase` and `.revision`.
    pub phase: Option<RolloutPhase>,
    pub rollout_revision: Option<u64>,
    pub rollout_message: Option<String>,
    /// `status.configRevision`: the instance's newest revision.
    pub config_revision: Option<u64>,
    /// `spec.version` and `spec.image` (what a user's Rollout replaces).
    pub version: Option<String>,
    pub image: Option<String>,
}

/// An action of the executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Clear this Rollout's hold on the instance: its own update starts.
    Release(InstanceRef),
    /// Write the Rollout's version (or image) into the instance's spec.
    SetVersion {
        instance: InstanceRef,
        version: Option<String>,
        image: Option<String>,
    },
}

/// The decision for one Rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct WavePlan {
    pub status: WaveStatus,
    pub steps: Vec<Step>,
}

fn parse_time(s: &str) -> Option<i64> {
    humantime::parse_rfc3339(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
}

fn is_done(s: WaveInstanceState) -> bool {
    matches!(
        s,
        WaveInstanceState::Succeeded | WaveInstanceState::Superseded | WaveInstanceState::Gone
    )
}

/// Decides the next steps of the Rollout `name`. `members` are its instances in order (a
/// system Rollout's `spec.instances`, or those a user's selector matched when it started); they
/// are read only when the status has none yet. `observed` has an entry for every instance that
/// still exists. `now` is in Unix seconds.
pub fn plan(
    name: &str,
    spec: &RolloutSpec,
    status: &WaveStatus,
    members: &[InstanceRef],
    observed: &HashMap<InstanceRef, Observed>,
    now: i64,
) -> WavePlan {
    let mut st = status.clone();
    let mut steps = Vec::new();
    if st.instances.is_empty() && st.started_at.is_none() {
        st.started_at = Some(rfc3339(now));
        st.instances = members
            .iter()
            .map(|m| WaveInstance {
                tenant: m.tenant.clone(),
                project: m.project.clone(),
                name: m.name.clone(),
                wave: 0,
                state: WaveInstanceState::Held,
                revision: observed.get(m).and_then(|o| o.config_revision),
                previous_version: None,
                previous_image: None,
                message: None,
            })
            .collect();
        // The revision a system Rollout moves to is the one its change made.
        if !spec.is_system() {
            for i in &mut st.instances {
                i.revision = None;
            }
        }
    }
    let sizes = wave_sizes(&spec.waves_or_default(), st.instances.len()).unwrap_or_else(|| {
        wave_sizes(&crate::model::default_waves(), st.instances.len()).unwrap_or_default()
    });
    st.waves = sizes.len() as u32;
    let mut wave = 0u32;
    // Decided afresh below (a resumed Rollout is no longer Paused).
    if st.phase == WavePhase::Paused {
        st.phase = WavePhase::Progressing;
    }
    for (at, i) in st.instances.iter_mut().enumerate() {
        while (wave as usize) < sizes.len() && at >= sizes[wave as usize] {
            wave += 1;
        }
        i.wave = wave;
    }
    if matches!(st.phase, WavePhase::Halted | WavePhase::Succeeded) {
        st.counts = counts(&st.instances);
        return WavePlan { status: st, steps };
    }

    // What each released instance shows now.
    for i in &mut st.instances {
        if matches!(
            i.state,
            WaveInstanceState::Succeeded
                | WaveInstanceState::Failed
                | WaveInstanceState::Superseded
                | WaveInstanceState::Gone
        ) {
            continue;
        }
        let Some(o) = observed.get(&i.instance()) else {
            i.state = WaveInstanceState::Gone;
            continue;
        };
        // A system Rollout's held instance no longer held by it, or an instance a Rollout
        // released that a newer change holds, was taken over. (A user's Rollout ignores holds
        // on instances it has not changed yet: writing its version takes them over.)
        let taken = match (&o.held_by, i.state) {
            (Some(h), _) if h != name => Some(format!("taken over by rollout {h}")),
            (None, WaveInstanceState::Held) if spec.is_system() => {
                Some("released by a newer change".to_string())
            }
            _ => None,
        };
        if let Some(why) = taken
            && (spec.is_system() || i.state == WaveInstanceState::Progressing)
        {
            i.state = WaveInstanceState::Superseded;
            i.message = Some(why);
            continue;
        }
        if i.state != WaveInstanceState::Progressing {
            continue;
        }
        if i.revision.is_none() {
            i.revision = o.config_revision;
        }
        let reached = matches!((o.rollout_revision, i.revision), (Some(r), Some(t)) if r >= t);
        match o.phase {
            Some(RolloutPhase::Succeeded) if reached => {
                i.state = WaveInstanceState::Succeeded;
                i.message = None;
            }
            Some(p @ (RolloutPhase::Failed | RolloutPhase::RolledBack)) if reached => {
                i.state = WaveInstanceState::Failed;
                let why = o
                    .rollout_message
                    .clone()
                    .unwrap_or_else(|| "its update did not pass the gate".into());
                i.message = Some(format!("{p:?}: {why}"));
            }
            _ => {}
        }
    }

    if let Some(f) = st
        .instances
        .iter()
        .find(|i| i.state == WaveInstanceState::Failed)
    {
        let held = st
            .instances
            .iter()
            .filter(|i| i.state == WaveInstanceState::Held)
            .count();
        st.phase = WavePhase::Halted;
        st.failed_instance = Some(f.instance().to_string());
        st.message = Some(format!(
            "halted in wave {} of {}: {} failed its gate ({}); {held} instance{} not yet released stay on their old revision",
            f.wave + 1,
            st.waves,
            f.instance(),
            f.message.as_deref().unwrap_or("failed"),
            if held == 1 { "" } else { "s" },
        ));
        st.finished_at = Some(rfc3339(now));
        st.counts = counts(&st.instances);
        return WavePlan { status: st, steps };
    }

    loop {
        let current = st.wave;
        if current >= st.waves {
            st.phase = WavePhase::Succeeded;
            st.message = Some(format!(
                "every instance moved ({} wave{})",
                st.waves,
                if st.waves == 1 { "" } else { "s" }
            ));
            st.finished_at = Some(rfc3339(now));
            break;
        }
        let in_wave = |i: &WaveInstance| i.wave <= current;
        let to_release: Vec<usize> = st
            .instances
            .iter()
            .enumerate()
            .filter(|(_, i)| in_wave(i) && i.state == WaveInstanceState::Held)
            .map(|(at, _)| at)
            .collect();
        if !to_release.is_empty() {
            if spec.paused {
                st.phase = WavePhase::Paused;
                st.message = Some(format!(
                    "paused before wave {} of {}",
                    current + 1,
                    st.waves
                ));
                break;
            }
            for at in to_release {
                let i = &mut st.instances[at];
                let r = i.instance();
                if spec.is_system() {
                    steps.push(Step::Release(r));
                } else {
                    let o = observed.get(&r).cloned().unwrap_or_default();
                    i.previous_version = o.version;
                    i.previous_image = o.image;
                    i.revision = None;
                    steps.push(Step::SetVersion {
                        instance: r,
                        version: spec.version.clone(),
                        image: spec.image.clone(),
                    });
                }
                i.state = WaveInstanceState::Progressing;
            }
            // Said below, as for a wave already under way (the same words on the next pass).
            continue;
        }
        let waiting = st
            .instances
            .iter()
            .filter(|i| in_wave(i) && !is_done(i.state))
            .count();
        if waiting > 0 {
            st.phase = WavePhase::Progressing;
            st.message = Some(format!(
                "wave {} of {}: {waiting} instance{} updating",
                current + 1,
                st.waves,
                if waiting == 1 { "" } else { "s" }
            ));
            break;
        }
        // The wave is done: bake, then the next one.
        if current + 1 >= st.waves {
            st.wave = st.waves;
            continue;
        }
        let done_at = st
            .wave_done_at
            .as_deref()
            .and_then(parse_time)
            .unwrap_or(now);
        st.wave_done_at = Some(rfc3339(done_at));
        let bake = spec.bake().as_secs() as i64;
        if now - done_at < bake {
            st.phase = WavePhase::Progressing;
            st.message = Some(format!(
                "wave {} of {} done; the next starts after the bake time, at {}",
                current + 1,
                st.waves,
                rfc3339(done_at + bake)
            ));
            break;
        }
        st.wave = current + 1;
        st.wave_done_at = None;
    }
    if spec.paused && st.phase == WavePhase::Progressing {
        st.phase = WavePhase::Paused;
        st.message = st.message.map(|m| format!("paused; {m}"));
    }
    st.counts = counts(&st.instances);
    WavePlan { status: st, steps }
}

fn counts(instances: &[WaveInstance]) -> WaveCounts {
    let mut c = WaveCounts::default();
    for i in instances {
        match i.state {
            WaveInstanceState::Held => c.held += 1,
            WaveInstanceState::Progressing => c.progressing += 1,
            WaveInstanceState::Succeeded => c.succeeded += 1,
            WaveInstanceState::Failed => c.failed += 1,
            WaveInstanceState::Superseded => c.superseded += 1,
            WaveInstanceState::Gone => c.gone += 1,
        }
    }
    c
}

/// What went wrong in a pass.
#[derive(Debug, thiserror::Error)]
pub enum WaveError {
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: Box<StoreError>,
    },
    #[error("writing {key}: {source}")]
    Write {
        key: ObjectKey,
        #[source]
        source: Box<StoreError>,
    },
    #[error("the wave controller's task failed: {0}")]
    Task(String),
}

fn instance_key(r: &InstanceRef) -> ObjectKey {
    ObjectKey::instance(&r.tenant, &r.project, &r.name)
}

/// One pass over every Rollout; returns how many were written.
pub fn reconcile_once(store: &dyn Store, now: i64) -> Result<usize, WaveError> {
    let read = |what, kind| {
        store
            .list(&ListFilter::all(kind))
            .map_err(|source| WaveError::Read {
                what,
                source: Box::new(source),
            })
    };
    let rollouts = read("rollouts", Kind::Rollout)?;
    if rollouts.is_empty() {
        return Ok(0);
    }
    let mut instances = HashMap::new();
    let mut all = Vec::new();
    let decoded =
        crate::store::decoded::list_decoded(store, Kind::OpenClawInstance).map_err(|source| {
            WaveError::Read {
                what: "instances",
                source: Box::new(source),
            }
        })?;
    for o in decoded.iter() {
        let Ok(Resource::OpenClawInstance(i)) = &o.resource else {
            continue;
        };
        let k = i.key();
        let r = InstanceRef {
            tenant: k.tenant,
            project: k.project,
            name: k.name,
        };
        let status = i.status.as_ref();
        let rollout = status.and_then(|s| s.rollout.as_ref());
        instances.insert(
            r.clone(),
            Observed {
                held_by: rollout.and_then(|r| r.held_by.clone()),
                phase: rollout.map(|r| r.phase),
                rollout_revision: rollout.map(|r| r.revision),
                rollout_message: rollout.and_then(|r| r.message.clone()),
                config_revision: status.and_then(|s| s.config_revision),
                version: i.spec.version.clone(),
                image: i.spec.image.clone(),
            },
        );
        all.push((r, i.metadata.labels.clone()));
    }
    let mut written = 0;
    for o in rollouts {
        let Ok(Resource::Rollout(r)) = o.resource() else {
            continue;
        };
        let status = r.status.clone().unwrap_or_default();
        if matches!(status.phase, WavePhase::Halted | WavePhase::Succeeded) {
            continue;
        }
        let members: Vec<InstanceRef> = if r.spec.is_system() {
            r.spec.instances.clone()
        } else if status.instances.is_empty() {
            let sel = r.spec.selector.clone().unwrap_or_default();
            let own = r.metadata.tenant.as_deref();
            all.iter()
                .filter(|(i, labels)| {
                    own.is_none_or(|t| t == i.tenant) && sel.matches(&i.tenant, &i.project, labels)
                })
                .map(|(i, _)| i.clone())
                .collect()
        } else {
            Vec::new()
        };
        let decided = plan(
            &r.metadata.name,
            &r.spec,
            &status,
            &members,
            &instances,
            now,
        );
        execute(store, &r, &decided.steps)?;
        if Some(&decided.status) != r.status.as_ref() {
            crate::events::record_all(
                store,
                wave_events(&o.key, r.status.as_ref(), &decided.status),
            );
            let key = o.key.clone();
            let new_status = decided.status;
            store
                .update(&key, &mut |res| {
                    if let Resource::Rollout(x) = res {
                        x.status = Some(new_status.clone());
                        true
                    } else {
                        false
                    }
                })
                .map_err(|source| WaveError::Write {
                    key,
                    source: Box::new(source),
                })?;
            written += 1;
        }
    }
    Ok(written)
}

fn execute(store: &dyn Store, r: &Rollout, steps: &[Step]) -> Result<(), WaveError> {
    let name = r.metadata.name.clone();
    for step in steps {
        match step {
            Step::Release(i) => {
                let key = instance_key(i);
                match store.update(&key, &mut |res| {
                    if let Resource::OpenClawInstance(x) = res
                        && let Some(ro) = x.status.as_mut().and_then(|s| s.rollout.as_mut())
                        && ro.held_by.as_deref() == Some(name.as_str())
                    {
                        ro.held_by = None;
                        return true;
                    }
                    false
                }) {
                    Ok(_) | Err(StoreError::NotFound(_)) => {}
                    Err(source) => {
                        return Err(WaveError::Write {
                            key,
                            source: Box::new(source),
                        });
                    }
                }
            }
            Step::SetVersion {
                instance,
                version,
                image,
            } => {
                let key = instance_key(instance);
                let Some(o) = store.get(&key).map_err(|source| WaveError::Read {
                    what: "an instance",
                    source: Box::new(source),
                })?
                else {
                    continue;
                };
                let Ok(Resource::OpenClawInstance(mut i)) = o.resource() else {
                    continue;
                };
                if image.is_some() {
                    i.spec.image.clone_from(image);
                } else {
                    i.spec.version.clone_from(version);
                    i.spec.image = None;
                }
                i.status = None;
                let note = ChangeNote {
                    author: format!("rollout/{name}"),
                    message: Some(format!(
                        "rollout {name} sets {}",
                        image
                            .as_ref()
                            .or(version.as_ref())
                            .map_or("", |s| s.as_str())
                    )),
                };
                store
                    .write_noted(
                        &[(Resource::OpenClawInstance(i), WriteMode::Update)],
                        false,
                        &note,
                    )
                    .map_err(|source| WaveError::Write {
                        key: key.clone(),
                        source: Box::new(source),
                    })?;
                // The version written is the newest change: an older change's hold goes.
                store
                    .update(&key, &mut |res| {
                        if let Resource::OpenClawInstance(x) = res
                            && let Some(ro) = x.status.as_mut().and_then(|s| s.rollout.as_mut())
                            && ro.held_by.is_some()
                        {
                            ro.held_by = None;
                            return true;
                        }
                        false
                    })
                    .map_err(|source| WaveError::Write {
                        key,
                        source: Box::new(source),
                    })?;
            }
        }
    }
    Ok(())
}

/// Runs [`reconcile_once`] on every store change and every [`RESYNC`] until `shutdown`.
pub async fn run(store: Arc<dyn Store>, shutdown: watch::Receiver<bool>) {
    super::runtime::run("waves", store, shutdown, RESYNC, |store: &dyn Store| {
        let n = reconcile_once(store, crate::util::unix_now())?;
        if n > 0 {
            tracing::info!(rollouts = n, "wave controller updated rollouts");
        }
        Ok::<_, WaveError>(None)
    })
    .await;
}

/// The events of a fleet-wide change: its phase turning, and each new wave.
pub fn wave_events(
    key: &ObjectKey,
    before: Option<&crate::model::WaveStatus>,
    after: &crate::model::WaveStatus,
) -> Vec<crate::events::Event> {
    use crate::events::Event;
    use crate::model::WavePhase;
    let mut out = Vec::new();
    let message = after.message.clone().unwrap_or_default();
    if before.is_none_or(|b| b.phase != after.phase) {
        let reason = format!("Rollout{:?}", after.phase);
        let e = match after.phase {
            WavePhase::Halted => Event::warning(key.clone(), &reason, message.clone()),
            _ => Event::normal(key.clone(), &reason, message.clone()),
        };
        out.push(e.source("rollout"));
    }
    if before.is_some_and(|b| b.wave != after.wave) {
        out.push(
            Event::normal(
                key.clone(),
                "WaveStarted",
                format!("wave {} of {} started", after.wave + 1, after.waves),
            )
            .source("rollout"),
        );
    }
    out
}

#[cfg(test)]
mod tests;
