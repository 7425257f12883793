# Task shortcuts; each recipe wraps a documented command.
# Tests need PostgreSQL: DATABASE_URL, a server on localhost:5432 (`just db-up`),
# local server binaries, or Docker (see dcb_testkit::pg).

# List the recipes.
default:
    @just --list

# Run the whole test suite.
test:
    cargo test --workspace

# Run every example once in memory (DATABASE_URL unset) and, if DATABASE_URL is set, once on PostgreSQL.
examples:
    #!/usr/bin/env bash
    set -euo pipefail
    shopt -s nullglob
    for path in examples/*.rs; do
        name=$(basename "$path" .rs)
        echo "== example $name (in memory)"
        env -u DATABASE_URL cargo run --release --example "$name"
        if [ -n "${DATABASE_URL:-}" ]; then
            echo "== example $name (PostgreSQL)"
            cargo run --release --example "$name"
        fi
    done

# Run the benchmarks.
bench:
    cargo bench

# Start PostgreSQL from docker-compose.yml and wait until it is healthy.
db-up:
    docker compose up -d --wait

# Stop and remove the PostgreSQL container and its data.
db-down:
    docker compose down --volumes

# Run the CI script locally.
ci:
    bash .ci/run

# Check formatting and lints.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
