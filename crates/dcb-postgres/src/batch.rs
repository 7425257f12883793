//! Multi-command appends: several commands with their own conditions in one transaction and
//! one round trip, all or nothing (the group-commit statement with every insert conditional on
//! every probe).
use crate::conn::Conn;
use crate::group_queue::Call;
use crate::store::PostgresEventStore;
use dcb_core::{conflict_within_batch, validate_batch, AppendCommand, Cursor, Error};

impl PostgresEventStore {
    /// [`EventStore::append_batch`](dcb_core::EventStore::append_batch) on PostgreSQL.
    pub(crate) async fn append_commands(
        &self,
        commands: Vec<AppendCommand>,
    ) -> Result<Vec<Cursor>, Error> {
        if let Err(err) = validate_batch(&commands, &self.limits()) {
            dcb_core::discard_commands(commands);
            return Err(err);
        }
        // A command depending on an earlier one of the batch conflicts without a round trip:
        // one statement's probes cannot see its own inserts.
        if let Some(info) = conflict_within_batch(&commands) {
            return Err(Error::Conflict(info));
        }
        let calls: Vec<Call> = commands
            .into_iter()
            .map(|c| {
                let condition = c.condition.map(|c| c.simplified());
                (c.events, condition)
            })
            .collect();
        let conn = Conn::get(&self.inner.pool, "append").await?;
        let results = self.run_group(&conn, calls, true).await?;
        // Nothing was inserted if any command conflicts: report the first.
        let first_conflict = results.iter().enumerate().find_map(|(index, r)| match r {
            Err(Error::Conflict(info)) => Some(info.clone().in_command(index)),
            _ => None,
        });
        if let Some(info) = first_conflict {
            return Err(Error::Conflict(info));
        }
        results.into_iter().collect()
    }
}
