//! Hot-path pieces measured alone: entry resolution (`EntryTable::lookup`) as the number
//! of entries grows from 10 to 100,000 (its cost must not grow with the count), and the
//! node pick (`Wrr::pick`) for pools of 3 to 100 nodes.
//!
//! `cargo bench --bench routing`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use envgate::balance::Wrr;
use envgate::routing::host::{Entry, EntryTable};
use envgate::topology::Member;

fn table(n: usize) -> EntryTable {
    let mut t = EntryTable::default();
    for i in 0..n {
        // A mix like real deployments: exact hosts, some wildcards, one port-wide entry.
        let e = if i % 10 == 0 {
            format!("*.tenant{i}.company.com:443")
        } else {
            format!("app{i}.company.com:443")
        };
        t.insert(&Entry::parse(&e).unwrap(), i).unwrap();
    }
    t.insert(&Entry::parse(":443").unwrap(), n).unwrap();
    t
}

fn entries(c: &mut Criterion) {
    let mut g = c.benchmark_group("entry_lookup");
    for n in [10usize, 1_000, 100_000] {
        let t = table(n);
        let exact = format!("App{}.Company.com:443", n / 2 + 1);
        let wild = format!("eu.api.tenant{}.company.com", (n / 20) * 10);
        g.bench_with_input(BenchmarkId::new("exact", n), &t, |b, t| {
            b.iter(|| t.lookup(black_box(Some(exact.as_bytes())), black_box(443)))
        });
        g.bench_with_input(BenchmarkId::new("wildcard", n), &t, |b, t| {
            b.iter(|| t.lookup(black_box(Some(wild.as_bytes())), black_box(443)))
        });
        g.bench_with_input(BenchmarkId::new("port_wide", n), &t, |b, t| {
            b.iter(|| t.lookup(black_box(Some(b"nowhere.example.org")), black_box(443)))
        });
    }
    g.finish();
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("wrr_pick");
    for n in [3usize, 10, 100] {
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                node: i,
                weight: 1 + (i % 5) as u32,
                backup: i == n - 1,
            })
            .collect();
        let wrr = Wrr::new(n);
        g.bench_with_input(BenchmarkId::new("all_up", n), &members, |b, m| {
            b.iter(|| wrr.pick(black_box(m), |_| true))
        });
        g.bench_with_input(BenchmarkId::new("half_down", n), &members, |b, m| {
            b.iter(|| wrr.pick(black_box(m), |node| node % 2 == 0))
        });
    }
    g.finish();
}

criterion_group!(benches, entries, pick);
criterion_main!(benches);
