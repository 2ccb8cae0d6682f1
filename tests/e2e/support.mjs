// What the browser tests share: the real pushhub binary on an ephemeral port, and Debian's
// Chromium driven by playwright-core with the flags every test here uses.
import { after } from "node:test";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { createInterface } from "node:readline";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.PUSHHUB_BIN ?? path.join(root, "target/debug/pushhub");
const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
// Chrome reports refused connections as console errors; they are expected while the server
// is down, and only then.
export const NETWORK_NOISE = /ERR_CONNECTION_REFUSED|WebSocket connection|Failed to load resource|net::ERR/;

const servers = new Set();
after(() => { for (const s of servers) s.proc.kill("SIGKILL"); });

export function startServer(listen = "127.0.0.1:0", extra = []) {
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, ["--listen", listen, ...extra], {
      env: { ...process.env, PUSHHUB_LOG: "pushhub=info", NO_COLOR: "1" },
      stdio: ["ignore", "pipe", "inherit"],
    });
    const server = { proc, addr: null };
    servers.add(server);
    createInterface({ input: proc.stdout }).on("line", (line) => {
      const match = /listening on http:\/\/([^/]+)\//.exec(line);
      if (match && !server.addr) { server.addr = match[1]; resolve(server); }
    });
    proc.on("exit", (code) => { servers.delete(server); if (!server.addr) reject(new Error(`pushhub exited: ${code}`)); });
  });
}

export async function stopServer(server) {
  server.proc.kill("SIGTERM");
  await once(server.proc, "exit");
}

export async function openBrowser() {
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS });
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(e.message));
  return { browser, page, errors };
}

