"""Fleet arithmetic shared by the reports and the plots: time and interval helpers and the
figures computed from loaded ``FleetData`` (pure Python; where each figure comes from and
how exact it is: ``report``'s notes)."""

from evse_agent.messages import iso_utc

CHARGING_W = 100.0  # total power above this means a car is drawing
STOPPING_EVENTS = ("pilot_error", "evse_unavailable", "contactor_welded", "contactor_failed_to_close")
METER_FLAGS = ("begin_delayed", "end_delayed", "register_backwards", "register_jump", "meter_replaced")
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
UTILISATION_STATES = ("charging", "connected_idle", "available", "faulted")
DAY_S = 86400
HOUR_S = 3600


def day_of(seconds):
    return iso_utc(seconds)[:10]


def days_in(since, until):
    """The UTC dates the window ``[since, until)`` touches."""
    days = []
    day = since - since % DAY_S
    while day < until:
        days.append(day_of(day))
        day += DAY_S
    return days


def spread_by_hour(start, end, weight, table):
    """Add ``weight`` x seconds of ``[start, end)`` to ``table[weekday][hour]`` (Monday = 0)."""
    hour = start - start % HOUR_S
    while hour < end:
        seconds = min(end, hour + HOUR_S) - max(start, hour)
        if seconds > 0:
            whole = int(hour)
            table[(whole // DAY_S + 3) % 7][whole % DAY_S // HOUR_S] += weight * seconds
        hour += HOUR_S


# -- intervals -------------------------------------------------------------------------------

def merged(intervals):
    """The union of ``[(start, end)]`` as sorted, disjoint intervals."""
    result = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result


def length(intervals):
    return sum(end - start for start, end in intervals)


def overlap(a, b):
    """Seconds two merged interval lists share."""
    total = 0.0
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            total += end - start
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def clip(start, end, since, until):
    return max(start, since), min(end, until)


# -- figures ---------------------------------------------------------------------------------

def charging_share(item):
    """The share of an aggregate interval spent charging (see ``report``'s notes)."""
    high, low, avg = item["power_max_w"], item["power_min_w"], item["power_avg_w"]
    if high is None or high < CHARGING_W:
        return 0.0
    if low is not None and low >= CHARGING_W:
        return 1.0
    return min(1.0, max(0.0, (avg or 0.0) / high))


def sessions_per_day(data):
    """{"days": [...], "counts": {station: {day: n}}} by plug-in day."""
    days = days_in(data.since, data.until)
    counts = {station: dict.fromkeys(days, 0) for station in data.stations}
    for session in data.sessions:
        if data.since <= session["plug_in_s"] < data.until:
            counts[session["station"]][day_of(session["plug_in_s"])] += 1
    return {"days": days, "counts": counts}


def energy_per_day(data):
    """{station: {day: {"sessions", "billed_wh", "metered_wh"}}}: billed on the plug-in day
    (ended sessions), metered from the register between the first readings of two days."""
    days = days_in(data.since, data.until)
    result = {station: {day: {"sessions": 0, "billed_wh": 0, "metered_wh": 0} for day in days}
              for station in data.stations}
    for session in data.sessions:
        if data.since <= session["plug_in_s"] < data.until:
            cell = result[session["station"]][day_of(session["plug_in_s"])]
            cell["sessions"] += 1
            if session["energy_wh"] is not None:
                cell["billed_wh"] += session["energy_wh"]
    for station, items in data.aggregates.items():
        for index, item in enumerate(items):
            first, last = item["energy_first_wh"], item["energy_last_wh"]
            if first is None or last is None:
                continue
            following = next((n["energy_first_wh"] for n in items[index + 1:index + 2]
                              if n["energy_first_wh"] is not None), None)
            step = (following if following is not None else last) - first
            if step < 0:  # the register went back (reset or replaced meter): count what this interval saw
                step = max(0, last - first)
            day = day_of(item["start"])
            if day in result[station] and data.since <= item["start"] < data.until:
                result[station][day]["metered_wh"] += step
    return result


def _connected(data, station):
    return merged([clip(s["plug_in_s"], s["unplug_s"] if s["unplug_s"] is not None else data.until,
                        data.since, data.until)
                   for s in data.sessions if s["station"] == station])


def _faulted(data, station):
    return merged([clip(e["start"], e["end"] if e["end"] is not None else data.until, data.since, data.until)
                   for e in data.events if e["station"] == station and e["type"] in STOPPING_EVENTS
                   and e["start"] is not None])


def _charging_seconds(data, station):
    total = 0.0
    for item in data.aggregates.get(station, ()):
        start, end = clip(item["start"], item["end"], data.since, data.until)
        if end > start:
            total += charging_share(item) * (end - start)
    return total


def utilisation(data):
    """{station: {state: seconds, ..., "window_s": s}} for UTILISATION_STATES."""
    result = {}
    window_s = data.until - data.since
    for station in data.stations:
        connected = _connected(data, station)
        faulted = _faulted(data, station)
        charging = _charging_seconds(data, station)
        faulted_connected = overlap(connected, faulted)
        idle = max(0.0, length(connected) - faulted_connected - charging)
        # Charging the session records do not cover (their records missing) is not available time.
        unplugged_charging = max(0.0, charging - (length(connected) - faulted_connected))
        busy = length(connected) + length(faulted) - faulted_connected + unplugged_charging
        result[station] = {"charging": charging, "connected_idle": idle, "faulted": length(faulted),
                           "available": max(0.0, window_s - busy), "window_s": window_s}
    return result


def peak_hours(data):
    """Hour-of-week tables [weekday][hour] (Monday first), averaged over each hour's
    occurrences in the window: cars plugged in, stations charging, fleet power in W."""
    plugged = [[0.0] * 24 for _ in range(7)]
    charging = [[0.0] * 24 for _ in range(7)]
    power = [[0.0] * 24 for _ in range(7)]
    hours = [[0.0] * 24 for _ in range(7)]
    spread_by_hour(data.since, data.until, 1.0 / HOUR_S, hours)
    for session in data.sessions:
        end = session["unplug_s"] if session["unplug_s"] is not None else data.until
        start, end = clip(session["plug_in_s"], end, data.since, data.until)
        spread_by_hour(start, end, 1.0 / HOUR_S, plugged)
    for items in data.aggregates.values():
        for item in items:
            start, end = clip(item["start"], item["end"], data.since, data.until)
            if end <= start:
                continue
            spread_by_hour(start, end, charging_share(item) / HOUR_S, charging)
            if item["power_avg_w"] is not None:
                spread_by_hour(start, end, item["power_avg_w"] / HOUR_S, power)

    def averaged(table):
        return [[None if hours[d][h] < 1e-9 else table[d][h] / hours[d][h] for h in range(24)] for d in range(7)]

    return {"plugged": averaged(plugged), "charging": averaged(charging), "power_w": averaged(power)}


def maintenance(data):
    """Per station, ranked by critical events per day, then all events per day."""
    days = (data.until - data.since) / DAY_S
    rows = []
    for station in data.stations:
        sessions = [s for s in data.sessions if s["station"] == station and data.since <= s["plug_in_s"] < data.until]
        events = [e for e in data.events if e["station"] == station and e["start"] is not None
                  and data.since <= e["start"] < data.until]
        by_type = {}
        for event in events:
            by_type[event["type"]] = by_type.get(event["type"], 0) + 1
        critical = sum(1 for e in events if e["severity"] == "critical")
        offline = [e for e in events if e["type"] == "meter_offline"]
        offline_s = sum((e["end"] if e["end"] is not None else data.until) - e["start"] for e in offline)
        rows.append({
            "station": station, "sessions": len(sessions), "events": len(events), "critical": critical,
            "warning": sum(1 for e in events if e["severity"] == "warning"),
            "events_per_day": len(events) / days, "critical_per_day": critical / days,
            "events_per_100_sessions": None if not sessions else 100.0 * len(events) / len(sessions),
            "meter_offline": len(offline), "meter_offline_per_day": len(offline) / days,
            "meter_offline_s": offline_s,
            "meter_flagged_sessions": sum(1 for s in sessions if set(s["flags"]) & set(METER_FLAGS)),
            "unverified_sessions": sum(1 for s in sessions if s["verified"] == 0),
            "by_type": by_type,
        })
    rows.sort(key=lambda r: (-r["critical_per_day"], -r["events_per_day"], r["station"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows
