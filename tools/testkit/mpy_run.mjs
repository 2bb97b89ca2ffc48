// Run a Python script under the official MicroPython (its WebAssembly port, from the npm
// registry: tools/testkit/mpy/package.json) on the host, with the portable core on its path.
//
//   node tools/testkit/mpy_run.mjs [--heap 64k] [--budget N] [--mpy DIR] [--stats FILE] script.py [args...]
//
// The core (firmware/evse_agent, without ports/cpython) is copied into MicroPython's
// in-memory file system at /lib/evse_agent — or, with --mpy DIR, the .mpy files that
// mpy-cross compiled into DIR/evse_agent (tools/cli/mpy_build.py), so what runs is the compiled core. The
// script's own directory becomes /scenario (first on sys.path).
//
// A script ends with ``harness.run(main)`` (host_tests/mpy/scenarios/harness.py): under this
// port the runner then awaits ``main()`` itself, since the WebAssembly port's asyncio runs on
// the JavaScript event loop (there is no blocking asyncio.run).
//
// Exit status: 0 when the script finished; 1 on an uncaught Python exception (its
// traceback is printed on stderr); 3 when --budget N is given and the GC heap had to grow
// past N bytes (see below); 2 on a usage error.
//
// Heap: this port starts with a GC heap of --heap bytes and, instead of raising
// MemoryError, adds heap areas when an allocation fails (MICROPY_GC_SPLIT_HEAP_AUTO); it
// collects garbage only when control is back in JavaScript (each await that sleeps). The
// heap's total therefore grows exactly when an allocation could not be served from the heap
// as it was — where a board with a fixed heap of that size would have raised MemoryError
// (or earlier: garbage made between two awaits is not collected here, so the check is
// stricter than a board). --budget makes that a failure; --stats writes the figures as JSON.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const CORE = path.join(ROOT, "firmware", "evse_agent");
const PACKAGE = path.join(ROOT, "tools", "testkit", "mpy", "node_modules", "@micropython",
    "micropython-webassembly-pyscript", "micropython.mjs");

function usage(text) {
    process.stderr.write("mpy_run: " + text + "\n");
    process.exit(2);
}

function parseSize(text) {
    const match = /^(\d+)([kKmM]?)$/.exec(text || "");
    if (!match) usage("bad size " + JSON.stringify(text) + " (bytes, or with k / m)");
    const scale = { "": 1, k: 1024, K: 1024, m: 1048576, M: 1048576 }[match[2]];
    return parseInt(match[1], 10) * scale;
}

const args = process.argv.slice(2);
let heap = 1048576;
let budget = null;
let mpyDir = null;
let statsFile = null;
while (args.length && args[0].startsWith("--")) {
    const option = args.shift();
    if (option === "--heap") heap = parseSize(args.shift());
    else if (option === "--budget") budget = parseSize(args.shift());
    else if (option === "--mpy") mpyDir = path.resolve(args.shift() || usage("--mpy needs a directory"));
    else if (option === "--stats") statsFile = args.shift() || usage("--stats needs a file");
    else usage("unknown option " + option);
}
if (!args.length) usage("usage: mpy_run.mjs [--heap 64k] [--budget N] [--mpy DIR] [--stats FILE] script.py [args...]");
const script = path.resolve(args[0]);
if (!fs.existsSync(PACKAGE)) {
    usage("MicroPython is not installed: run `npm ci --prefix tools/testkit/mpy` (make test does)");
}

const { loadMicroPython } = await import(pathToFileURL(PACKAGE).href);

// Output: Python's stdout and stderr go to ours, except while the runner captures
// micropython.mem_info() for the heap figures.
let capture = null;
const mp = await loadMicroPython({
    heapsize: heap,
    linebuffer: true,
    stdout: (line) => (capture !== null ? capture.push(line) : process.stdout.write(line + "\n")),
    stderr: (line) => process.stderr.write(line + "\n"),
});

function copyTree(source, target, skip) {
    mp.FS.mkdirTree(target);
    for (const entry of fs.readdirSync(source, { withFileTypes: true })) {
        if (skip(entry.name)) continue;
        const from = path.join(source, entry.name);
        const to = target + "/" + entry.name;
        if (entry.isDirectory()) copyTree(from, to, skip);
        else mp.FS.writeFile(to, fs.readFileSync(from));
    }
}

const coreSource = mpyDir ? path.join(mpyDir, "evse_agent") : CORE;
copyTree(coreSource, "/lib/evse_agent",
    (name) => name === "__pycache__" || name === "cpython" || !(name.endsWith(mpyDir ? ".mpy" : ".py") || !name.includes(".")));
copyTree(path.dirname(script), "/scenario", (name) => name === "__pycache__" || !name.endsWith(".py"));
mp.FS.mkdirTree("/tmp");

function heapTotal() {
    capture = [];
    try {
        mp.runPython("import micropython\nmicropython.mem_info()");
    } finally {
        const lines = capture;
        capture = null;
        for (const line of lines) {
            const match = /GC: total: (\d+), used: (\d+), free: (\d+)/.exec(line);
            if (match) return { total: +match[1], used: +match[2], free: +match[3] };
        }
    }
    throw new Error("micropython.mem_info() gave no GC line");
}

const initial = heapTotal();
let status = 0;
let failure = null;
try {
    mp.runPython(
        "import sys\n" +
        "sys.path.insert(0, '/scenario')\n" +
        "import harness\n" +
        "harness.DEFERRED = True\n" +
        "harness.ARGV = " + JSON.stringify([script].concat(args.slice(1))) + "\n");
    mp.runPython(fs.readFileSync(script, "utf8"));
    await mp.runPythonAsync("await harness.finish()");
} catch (error) {
    if (error && error.name === "PythonError") {
        failure = error.type;
        status = 1;
        process.stderr.write("mpy_run: uncaught " + error.message + "\n");
    } else {
        throw error;
    }
}

const final = heapTotal();
function pyValue(expression) {
    mp.runPython("_mpy_run_value = " + expression);
    return mp.globals.get("_mpy_run_value");
}

let peak = null;
try {
    peak = pyValue("harness.stats_json()");
} catch (error) {
    peak = null;
}
const stats = {
    micropython: pyValue("'%d.%d.%d' % __import__('sys').implementation.version[:3]"),
    heap_initial: initial.total,
    heap_final: final.total,
    heap_grew: final.total > initial.total,
    budget: budget,
    failure: failure,
    harness: peak ? JSON.parse(peak) : null,
};
if (budget !== null && final.total > budget) {
    process.stderr.write("mpy_run: the GC heap grew to " + final.total + " bytes, past the budget of " +
        budget + " bytes: an allocation could not be served within it\n");
    if (status === 0) status = 3;
}
if (statsFile) fs.writeFileSync(statsFile, JSON.stringify(stats, null, 2) + "\n");
process.exit(status);
