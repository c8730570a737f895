//! The standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! ...), read from `/proc/self` at scrape time. Anything that cannot be read is left out.

use prometheus::proto::MetricType;

use super::Families;

pub(super) fn collect(out: &mut Families) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // The command name (field 2) may hold spaces and parentheses: fields are counted
    // after its closing parenthesis, from field 3 (the state).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as f64;
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        out.family(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            MetricType::COUNTER,
        )
        .sample(&[], (utime + stime) / ticks);
    }
    if let Some(vsize) = field(23) {
        out.family(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            MetricType::GAUGE,
        )
        .sample(&[], vsize);
    }
    if let Some(rss) = field(24) {
        out.family(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            MetricType::GAUGE,
        )
        .sample(&[], rss * page);
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(start), Some(boot)) = (field(22), boot) {
        out.family(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            MetricType::GAUGE,
        )
        .sample(&[], boot + start / ticks);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.family(
            "process_open_fds",
            "Number of open file descriptors.",
            MetricType::GAUGE,
        )
        .sample(&[], fds.count() as f64);
    }
    let max = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        });
    if let Some(max) = max {
        out.family(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            MetricType::GAUGE,
        )
        .sample(&[], max);
    }
}
