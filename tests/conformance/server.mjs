// Starts real processes for the Durable Streams tests: pushhub (PUSHHUB_BIN) on a free
// loopback port, and redis-server when a run needs one. Every process is killed on exit.
import { spawn } from "node:child_process";
import net from "node:net";

const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function waitFor(check, what, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`${what} did not come up`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function track(child, name) {
  children.add(child);
  let output = "";
  child.stdout?.on("data", (d) => (output = (output + d).slice(-4000)));
  child.stderr?.on("data", (d) => (output = (output + d).slice(-4000)));
  child.on("exit", () => children.delete(child));
  child.output = () => `${name}: ${output}`;
  return child;
}

/** Starts pushhub with `args` on `port` (a free one if not given); resolves once it answers. */
export async function startPushhub(args = [], port) {
  const bin = process.env.PUSHHUB_BIN;
  if (!bin) throw new Error("set PUSHHUB_BIN to the pushhub binary");
  port ??= await freePort();
  const child = track(
    spawn(bin, ["--listen", `127.0.0.1:${port}`, ...args], { stdio: ["ignore", "pipe", "pipe"] }),
    "pushhub",
  );
  const base = `http://127.0.0.1:${port}`;
  await waitFor(async () => (await fetch(`${base}/healthz`)).ok, "pushhub");
  return { child, port, base, stop: (signal = "SIGTERM") => stop(child, signal) };
}

/** Starts a throwaway redis-server (no persistence) on a free port. */
export async function startRedis() {
  const port = await freePort();
  const child = track(
    spawn("redis-server", ["--port", String(port), "--save", "", "--appendonly", "no"], {
      stdio: ["ignore", "pipe", "pipe"],
    }),
    "redis",
  );
  await waitFor(
    () =>
      new Promise((resolve) => {
        const socket = net.connect(port, "127.0.0.1", () => {
          socket.end();
          resolve(true);
        });
        socket.on("error", () => resolve(false));
      }),
    "redis-server",
  );
  return { child, url: `redis://127.0.0.1:${port}`, stop: () => stop(child, "SIGKILL") };
}

function stop(child, signal) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once("exit", resolve);
    child.kill(signal);
  });
}
