"""PNG charts of the fleet, drawn with matplotlib (Agg: no display needed).

- ``load-profile.png``: mean power by hour of the day (UTC), per station and for the fleet;
- ``peak-hours.png``: hour-of-week heat maps of stations charging and of fleet power;
- ``session-<id>.png``: one session's power (each aggregate's mean, with its min-max band)
  between plug-in and unplug.

The figures are the report's (``report.peak_hours``, the aggregates ``report.load`` reads).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)

from evse_agent.messages import iso_utc  # noqa: E402

from .fleet import HOUR_S, WEEKDAYS, clip, peak_hours, spread_by_hour  # noqa: E402

DPI = 100
SIZE_IN = (11, 5.5)


def load_profile(data):
    """{station: [mean W for hours 0..23]} and the fleet's sum under ``"fleet"``."""
    hours = [[0.0] * 24 for _ in range(7)]
    spread_by_hour(data.since, data.until, 1.0 / HOUR_S, hours)
    per_hour = [sum(hours[d][h] for d in range(7)) for h in range(24)]
    profiles = {}
    for station in data.stations:
        energy = [[0.0] * 24 for _ in range(7)]
        for item in data.aggregates.get(station, ()):
            start, end = clip(item["start"], item["end"], data.since, data.until)
            if end > start and item["power_avg_w"] is not None:
                spread_by_hour(start, end, item["power_avg_w"] / HOUR_S, energy)
        profiles[station] = [sum(energy[d][h] for d in range(7)) / per_hour[h] if per_hour[h] else 0.0
                             for h in range(24)]
    profiles["fleet"] = [sum(profiles[s][h] for s in data.stations) for h in range(24)]
    return profiles


def plot_load_profile(data, path):
    profiles = load_profile(data)
    figure, axes = plt.subplots(figsize=SIZE_IN, dpi=DPI)
    edges = list(range(25))
    for station in data.stations:
        axes.stairs([w / 1000 for w in profiles[station]], edges, label=station, linewidth=1.2)
    axes.stairs([w / 1000 for w in profiles["fleet"]], edges, label="fleet", color="black", linewidth=2.4)
    axes.set_xticks(edges)
    axes.set_xlim(0, 24)
    axes.set_xlabel("hour of day (UTC)")
    axes.set_ylabel("mean power (kW)")
    axes.set_title("Daily load profile, %s to %s" % (iso_utc(data.since)[:16], iso_utc(data.until)[:16]))
    axes.grid(alpha=0.3)
    axes.legend(ncol=2, fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_peak_hours(data, path):
    figures = peak_hours(data)
    figure, panels = plt.subplots(2, 1, figsize=(11, 7), dpi=DPI, sharex=True)
    for axes, key, title, scale, unit in ((panels[0], "charging", "Stations charging (mean)", 1.0, "stations"),
                                          (panels[1], "power_w", "Fleet power (mean)", 0.001, "kW")):
        table = [[0.0 if value is None else value * scale for value in row] for row in figures[key]]
        image = axes.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest")
        axes.set_yticks(range(7))
        axes.set_yticklabels(WEEKDAYS)
        axes.set_title(title + " by hour of week (UTC)")
        figure.colorbar(image, ax=axes, label=unit)
    panels[1].set_xticks(range(24))
    panels[1].set_xlabel("hour of day (UTC)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def session_curve(data, session_id):
    """(session, its aggregates); ValueError naming the session if it is not in the data or
    has no aggregates."""
    session = next((s for s in data.sessions if s["session_id"] == session_id), None)
    if session is None:
        raise ValueError("session %r is not in the database (for the chosen stations and window)" % session_id)
    end = session["unplug_s"] if session["unplug_s"] is not None else data.until
    items = [item for item in data.aggregates.get(session["station"], ())
             if item["end"] > session["plug_in_s"] and item["start"] < end and item["power_avg_w"] is not None]
    if not items:
        raise ValueError("session %s has no aggregates between %s and %s"
                         % (session_id, session["plug_in"], session["unplug"]))
    return session, items


def plot_session(data, session_id, path):
    """The power curve of ``session_id``."""
    session, items = session_curve(data, session_id)
    end = session["unplug_s"] if session["unplug_s"] is not None else data.until
    start = session["plug_in_s"]
    minutes = [(item["start"] - start) / 60 for item in items] + [(items[-1]["end"] - start) / 60]
    avg = [item["power_avg_w"] / 1000 for item in items]
    low = [(item["power_min_w"] or 0.0) / 1000 for item in items]
    high = [(item["power_max_w"] or 0.0) / 1000 for item in items]
    figure, axes = plt.subplots(figsize=SIZE_IN, dpi=DPI)
    axes.stairs(high, minutes, baseline=low, fill=True, alpha=0.25, label="min-max")
    axes.stairs(avg, minutes, label="mean", linewidth=2)
    axes.axvline(0, color="green", linestyle="--", label="plug-in")
    axes.axvline((end - start) / 60, color="red", linestyle="--", label="unplug")
    axes.set_xlabel("minutes since plug-in (%s)" % session["plug_in"])
    axes.set_ylabel("power (kW)")
    energy = "-" if session["energy_wh"] is None else "%d Wh" % session["energy_wh"]
    axes.set_title("Session %s at %s: %s billed" % (session_id, session["station"], energy))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_plots(data, out_dir, session_id=None):
    """Write the charts into ``out_dir`` (created if missing); returns their paths."""
    if session_id is not None:
        session_curve(data, session_id)  # refuse an unknown session before writing anything
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "load-profile.png"), os.path.join(out_dir, "peak-hours.png")]
    plot_load_profile(data, paths[0])
    plot_peak_hours(data, paths[1])
    if session_id is not None:
        path = os.path.join(out_dir, "session-%s.png" % session_id)
        plot_session(data, session_id, path)
        paths.append(path)
    return paths
