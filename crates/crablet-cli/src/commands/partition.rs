//! `crablet partition`: turn the event log (and the commands table) into range partitions,
//! create partitions ahead, list them, detach old ones for archiving.
use crate::connect::Target;
use crate::error::CliResult;
use dcb_postgres::{PartitionConfig, PartitionInfo};

/// Partitions the store's events by position in ranges of `range` positions (or updates the
/// configuration of a partitioned store), then lists the partitions.
pub async fn enable(
    target: &Target,
    range: i64,
    ahead: i32,
    headroom: Option<i64>,
    command_range: Option<i64>,
) -> CliResult {
    let store = target.connect().await?;
    let mut config = PartitionConfig::new(range).ahead(ahead);
    if let Some(headroom) = headroom {
        config = config.conversion_headroom(headroom);
    }
    if let Some(command_range) = command_range {
        config = config.command_range(command_range);
    }
    let partitions = store.partition(config).await?;
    println!(
        "schema {:?}: events partitioned in ranges of {range} positions, commands in ranges \
         of {} transaction ids, {ahead} ahead",
        target.schema,
        config.command_range_size()
    );
    print_partitions(&partitions);
    println!("commands, by transaction id:");
    print_partitions(&store.command_partitions().await?);
    Ok(())
}

/// Creates the partitions missing for `extra` more positions plus the configured margin.
pub async fn create_ahead(target: &Target, extra: i64) -> CliResult {
    let store = target.connect().await?;
    let created = store.create_partitions_ahead(extra).await?;
    if created.is_empty() {
        println!("no partition was missing");
    }
    for name in created {
        println!("created {name}");
    }
    Ok(())
}

/// Lists the partitions of the log, by position, then those of the commands table, by
/// transaction id.
pub async fn list(target: &Target, json: bool) -> CliResult {
    let store = target.connect().await?;
    let partitions = store.partitions().await?;
    let commands = store.command_partitions().await?;
    if json {
        let tagged = partitions
            .iter()
            .map(|p| ("events", p))
            .chain(commands.iter().map(|p| ("commands", p)));
        let rows: Vec<serde_json::Value> = tagged
            .map(|(table, p)| {
                serde_json::json!({
                    "table": table,
                    "name": p.name,
                    "from": p.from,
                    "to": p.to,
                    "estimated_rows": p.estimated_rows,
                    "total_bytes": p.total_bytes,
                    "detach_pending": p.detach_pending,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else if partitions.is_empty() {
        println!("schema {:?}: events is not partitioned", target.schema);
    } else {
        print_partitions(&partitions);
        if !commands.is_empty() {
            println!("commands, by transaction id:");
            print_partitions(&commands);
        }
    }
    Ok(())
}

/// Detaches an old partition (and drops it with `drop`).
pub async fn detach(target: &Target, name: &str, drop: bool) -> CliResult {
    let store = target.connect().await?;
    store.detach_partition(name, drop).await?;
    if drop {
        println!("detached and dropped {name}");
    } else {
        println!(
            "detached {name}: it is the table {}.{name} now; dump it (pg_dump -t) and drop it",
            target.schema
        );
    }
    Ok(())
}

fn print_partitions(partitions: &[PartitionInfo]) {
    println!(
        "{:<28} {:>20} {:>20} {:>14} {:>14}",
        "PARTITION", "FROM", "TO", "ROWS~", "BYTES"
    );
    for p in partitions {
        let from = p.from.map_or("MINVALUE".to_string(), |f| f.to_string());
        let rows = p.estimated_rows.map_or("-".to_string(), |r| r.to_string());
        let pending = if p.detach_pending {
            " (detach pending)"
        } else {
            ""
        };
        println!(
            "{:<28} {:>20} {:>20} {:>14} {:>14}{pending}",
            p.name, from, p.to, rows, p.total_bytes
        );
    }
}
