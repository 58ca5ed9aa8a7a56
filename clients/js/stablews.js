// stablews browser client: the client side of protocol.md v1, with the recovery options of
// configuration.md. An ES module with no dependencies; the server serves it at /client/stablews.js.
//
//   import { StableClient } from "/client/stablews.js";
//   const client = new StableClient("wss://host/ws", { channels: ["demo.ticker"], token: null });
//   client.on("message", (msg) => {});      // each `message` exactly once, in offset order
//   client.on("resync", (channel, info) => {});  // its recovery failed: reload that channel's state
//   client.on("state", (state) => {});       // "connecting" | "connected" | "reconnecting" | "closed"
//   client.connect();
//
// It behaves as the Python client (stablews.client): hello with resume, heartbeat answers,
// dead-server detection, backoff with jitter and a circuit breaker, `reconnect` advice and close
// codes honoured, positions per channel, resync on `recovered: false`, a new epoch or a gap.
// Durations are in seconds, as in configuration.md.

export const VERSION = "0.1.0";
export const SUBPROTOCOL = "stablews.v1";
export const STATES = Object.freeze(["connecting", "connected", "reconnecting", "closed"]);
export const EVENTS = Object.freeze([
  "message", "resync", "state", "connected", "disconnected", "reconnecting", "recovered", "circuit", "error",
]);

// Close codes after which reconnecting cannot help (protocol.md): the client stops.
export const FINAL_CODES = new Set([1000, 1008, 1009, 4401]);
// Drops after which the same instance is unlikely to answer: no close frame (browsers report
// 1006; it died, or the network between us did), or 1001 (it is shutting down).
const INSTANCE_GONE = new Set([1006, 1001]);
const DEFAULT_SILENCE = 40; // heartbeat_interval + heartbeat_timeout defaults, until `welcome` says otherwise

export const DEFAULT_POLICY = Object.freeze({
  maxRetries: 5,
  initialDelay: 1,
  maxDelay: 30,
  backoffMultiplier: 2,
  jitterMax: 1,
  enableCircuitBreaker: true,
  circuitBreakerThreshold: 5,
  circuitBreakerTimeout: 60,
  enableAutoRecovery: true,
});

/** A policy from camelCase or configuration.md's snake_case names; unknown names are refused. */
export function recoveryPolicy(options = {}) {
  const policy = { ...DEFAULT_POLICY };
  for (const [name, value] of Object.entries(options)) {
    const key = name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in DEFAULT_POLICY)) throw new Error(`unknown recovery option ${name}`);
    policy[key] = value;
  }
  if (!(policy.initialDelay > 0)) throw new Error("initialDelay must be greater than 0");
  if (policy.maxDelay < policy.initialDelay) throw new Error("maxDelay must be at least initialDelay");
  if (!(policy.backoffMultiplier >= 1)) throw new Error("backoffMultiplier must be at least 1");
  if (!(policy.jitterMax >= 0)) throw new Error("jitterMax must be at least 0");
  if (!(policy.circuitBreakerThreshold >= 1)) throw new Error("circuitBreakerThreshold must be at least 1");
  return Object.freeze(policy);
}

/** Exponential backoff with additive uniform jitter (recovery.py's Backoff). */
export class Backoff {
  constructor(policy, random = Math.random) {
    this.initial = policy.initialDelay;
    this.multiplier = policy.backoffMultiplier;
    this.maximum = policy.maxDelay;
    this.jitterMax = policy.jitterMax;
    this.random = random;
  }

  /** The delay before attempt `attempt` (0-based) without jitter: grows, then stays at the cap. */
  base(attempt) {
    let delay = this.initial;
    for (let i = 0; i < attempt; i++) {
      delay *= this.multiplier;
      if (delay >= this.maximum) return this.maximum;
    }
    return Math.min(delay, this.maximum);
  }

  delay(attempt) {
    const jitter = this.jitterMax > 0 ? this.random() * this.jitterMax : 0;
    return this.base(attempt) + jitter;
  }
}

/** closed → open after `threshold` consecutive failures → half-open after `timeout` (one trial)
 * → closed on a success, open again on a failure. The open → half-open move happens when the
 * state is consulted. */
export class CircuitBreaker {
  constructor(threshold, timeout, clock, onChange = null) {
    this.threshold = threshold;
    this.timeout = timeout;
    this.clock = clock;
    this.onChange = onChange;
    this._state = "closed";
    this.consecutiveFailures = 0;
    this.openedAt = null;
    this.openedTotal = 0;
    this._trialInFlight = false;
  }

  get state() {
    if (this._state === "open" && this.clock() - (this.openedAt ?? 0) >= this.timeout) this._set("half_open");
    return this._state;
  }

  /** Seconds until an attempt is allowed (0 when one is allowed now). */
  retryAfter() {
    const state = this.state;
    if (state === "open") return Math.max(0, (this.openedAt ?? 0) + this.timeout - this.clock());
    if (state === "half_open" && this._trialInFlight) return this.timeout;
    return 0;
  }

  allow() {
    const state = this.state;
    if (state === "closed") return true;
    if (state === "half_open" && !this._trialInFlight) {
      this._trialInFlight = true;
      return true;
    }
    return false;
  }

  recordSuccess() {
    this.consecutiveFailures = 0;
    this._trialInFlight = false;
    if (this._state !== "closed") {
      this.openedAt = null;
      this._set("closed");
    }
  }

  recordFailure() {
    this.consecutiveFailures += 1;
    const state = this.state;
    this._trialInFlight = false;
    if (state === "half_open" || (state === "closed" && this.consecutiveFailures >= this.threshold)) this.trip();
  }

  trip() {
    this.openedAt = this.clock();
    this._trialInFlight = false;
    if (this._state !== "open") {
      this.openedTotal += 1;
      this._set("open");
    }
  }

  _set(next) {
    const old = this._state;
    this._state = next;
    if (this.onChange && old !== next) this.onChange(old, next);
  }
}

export class GiveUp extends Error {}

/** One connection's recovery: the episode, the breaker and the figures (recovery.py's Recovery). */
export class Recovery {
  constructor(policy, { clock, random = Math.random, onCircuitChange = null, history = 100 } = {}) {
    this.policy = policy;
    this.clock = clock;
    this.backoff = new Backoff(policy, random);
    this.breaker = new CircuitBreaker(policy.circuitBreakerThreshold, policy.circuitBreakerTimeout, clock,
      onCircuitChange);
    this.history = history;
    this.inEpisode = false;
    this.episodeStarted = null;
    this.episodeAttempts = 0; // failed attempts in this episode
    this._advice = null;
    this.attempts = 0;
    this.successes = 0;
    this.failures = 0;
    this.episodes = 0;
    this.gaveUp = false;
    this.recoverTimes = [];
  }

  /** The connection dropped: a new episode starts (no-op inside one). */
  lost(advice = null) {
    if (this.inEpisode) return;
    this.inEpisode = true;
    this.episodes += 1;
    this.episodeStarted = this.clock();
    this.episodeAttempts = 0;
    this._advice = advice;
  }

  /** Seconds to wait before the next attempt; throws GiveUp when there is none. */
  nextDelay() {
    const policy = this.policy;
    if (this.inEpisode && !policy.enableAutoRecovery) {
      this.gaveUp = true;
      throw new GiveUp("auto recovery is off");
    }
    if (policy.enableCircuitBreaker) {
      const wait = this.breaker.retryAfter();
      if (wait > 0) return wait;
    } else if (this.episodeAttempts >= policy.maxRetries && this.inEpisode) {
      this.gaveUp = true;
      throw new GiveUp(`${this.episodeAttempts} attempts failed`);
    }
    if (this._advice !== null && this.episodeAttempts === 0) return this._advice;
    if (!this.inEpisode) return 0;
    return this.backoff.delay(this.episodeAttempts);
  }

  /** An attempt is about to start; false when the breaker does not allow it yet. */
  startAttempt() {
    if (this.policy.enableCircuitBreaker && !this.breaker.allow()) return false;
    this.attempts += 1;
    return true;
  }

  /** A verified success; returns the episode's time to recover (null outside an episode). */
  succeeded() {
    this.successes += 1;
    this.breaker.recordSuccess();
    let recoveredIn = null;
    if (this.inEpisode && this.episodeStarted !== null) {
      recoveredIn = this.clock() - this.episodeStarted;
      this.recoverTimes.push(recoveredIn);
      if (this.recoverTimes.length > this.history) this.recoverTimes.shift();
    }
    this.inEpisode = false;
    this.episodeAttempts = 0;
    this._advice = null;
    return recoveredIn;
  }

  failed() {
    this.failures += 1;
    this.episodeAttempts += 1;
    this._advice = null; // the advice was for the first attempt only
    if (!this.inEpisode) { // the very first connection failed: that starts an episode too
      this.inEpisode = true;
      this.episodes += 1;
      this.episodeStarted = this.clock();
    }
    if (!this.policy.enableCircuitBreaker) return;
    this.breaker.recordFailure();
    if (this.episodeAttempts >= this.policy.maxRetries && this.breaker.state !== "open") this.breaker.trip();
    if (this.breaker.state === "open") this.episodeAttempts = 0; // after the open period, backoff starts again
  }

  get circuitState() {
    return this.policy.enableCircuitBreaker ? this.breaker.state : "closed";
  }

  /** The same keys as the Python client's recovery statistics. */
  stats() {
    const times = this.recoverTimes;
    const sorted = [...times].sort((a, b) => a - b);
    const mid = sorted.length >> 1;
    const median = sorted.length === 0 ? null
      : sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
    return {
      attempts: this.attempts,
      successes: this.successes,
      failures: this.failures,
      success_rate: this.attempts ? round(this.successes / this.attempts, 4) : null,
      episodes: this.episodes,
      in_episode: this.inEpisode,
      gave_up: this.gaveUp,
      circuit_state: this.circuitState,
      circuit_opened_total: this.breaker.openedTotal,
      consecutive_failures: this.breaker.consecutiveFailures,
      time_to_recover_seconds: {
        count: times.length,
        last: times.length ? round(times[times.length - 1], 4) : null,
        median: median === null ? null : round(median, 4),
        max: times.length ? round(Math.max(...times), 4) : null,
      },
    };
  }
}

/** The client stopped for good: a final close code, recovery gave up, or close(). */
export class ClientClosed extends Error {
  constructor(message, code = null) {
    super(message);
    this.code = code;
  }
}

/** The server answered a request (publish) with an `error`. */
export class RequestFailed extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

class Dropped extends Error {
  constructor(why, code, { verified, final = false }) {
    super(why);
    this.code = code;
    this.verified = verified;
    this.final = final;
  }
}

const monotonic = () => performance.now() / 1000;

export class StableClient {
  /**
   * @param {string|null} url  ws:// or wss:// address (or give options.urls to move between instances)
   * @param {object} options   channels, token, tokenIn ("hello" | "query"), policy (recovery options),
   *   positions ({channel: {epoch, offset}}), name, openTimeout, verifyTimeout (seconds),
   *   random (() => [0, 1), for the jitter), clock (() => seconds), WebSocket (constructor)
   */
  constructor(url, options = {}) {
    const urls = options.urls ? [...options.urls] : url ? [url] : [];
    if (urls.length === 0) throw new Error("give a url or options.urls");
    const tokenIn = options.tokenIn ?? "hello";
    if (tokenIn !== "hello" && tokenIn !== "query") throw new Error('tokenIn must be "hello" or "query"');
    this.urls = urls;
    this.url = urls[0];
    this.token = options.token ?? null;
    this.tokenIn = tokenIn;
    this.name = options.name ?? "stablews-js";
    this.openTimeout = options.openTimeout ?? 10;
    this.verifyTimeout = options.verifyTimeout ?? 10;
    this.policy = recoveryPolicy(options.policy);
    this.clock = options.clock ?? monotonic;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.recovery = new Recovery(this.policy, {
      clock: this.clock,
      random: options.random ?? Math.random,
      onCircuitChange: (old, next) => this._emit("circuit", next, old),
    });
    this.channels = [...new Set(options.channels ?? [])];
    this.positions = new Map(Object.entries(options.positions ?? {}).map(
      ([channel, pos]) => [channel, { epoch: String(pos.epoch), offset: Number(pos.offset) }]));
    this.state = "closed";
    this.connectionId = null;
    this.server = null;
    this.traceId = null;
    this.silence = DEFAULT_SILENCE;
    this.error = null;
    this._handlers = Object.fromEntries(EVENTS.map((name) => [name, []]));
    this._ws = null;
    this._running = null;
    this._closing = false;
    this._connected = false;
    this._advice = null;
    this._urlIndex = 0;
    this._ids = 0;
    this._waiters = new Map();
    this._wake = null; // resolves the backoff sleep early (close())
    this._sessionEnd = null; // ends the current connection (close(), silence)
    // Figures beyond the recovery machinery's own.
    this.messagesReceived = 0;
    this.duplicatesDropped = 0;
    this.gaps = 0;
    this.resumed = 0;
    this.resynced = 0;
    this.replayed = 0;
    this.drops = 0;
    this.lastClose = null;
  }

  // ---------------------------------------------------------------- public surface

  /** message(msg) · resync(channel, info) · state(state) · connected(info) · disconnected(info) ·
   * reconnecting(info) · recovered(channel, replayed) · circuit(state, previous) · error(msg).
   * Returns a function that removes the handler. */
  on(event, handler) {
    if (!(event in this._handlers)) throw new Error(`unknown event ${event}; one of ${EVENTS.join(", ")}`);
    this._handlers[event].push(handler);
    return () => {
      const list = this._handlers[event];
      const at = list.indexOf(handler);
      if (at >= 0) list.splice(at, 1);
    };
  }

  /** Start connecting in the background (returns at once; see waitConnected). */
  connect() {
    if (this._running === null) {
      this._closing = false;
      this.error = null;
      this._running = this._run().finally(() => { this._running = null; });
    }
    return this;
  }

  /** Resolves once a connection is verified; rejects with ClientClosed if the client stops first,
   * or with an Error after `timeout` seconds. */
  waitConnected(timeout = null) {
    if (this._connected) return Promise.resolve();
    return new Promise((resolve, reject) => {
      let timer = null;
      const done = (fn, value) => { offState(); offConnected(); if (timer) clearTimeout(timer); fn(value); };
      const offConnected = this.on("connected", () => done(resolve));
      const offState = this.on("state", (state) => {
        if (state === "closed") done(reject, this.error ?? new ClientClosed("the client is closed"));
      });
      if (this._running === null) done(reject, this.error ?? new ClientClosed("the client is closed"));
      else if (timeout !== null) timer = setTimeout(() => done(reject, new Error("timed out")), timeout * 1000);
    });
  }

  /** Close with 1000 and stop. Resolves when the connection loop has ended. */
  async close() {
    this._closing = true;
    const ws = this._ws;
    if (ws && ws.readyState <= 1) ws.close(1000, "client closing");
    if (this._sessionEnd) this._sessionEnd(new Dropped("client closing", 1000, { verified: this._connected }));
    if (this._wake) this._wake();
    const running = this._running;
    if (running) await running.catch(() => {});
    this._connected = false;
    this._setState("closed");
  }

  /** Join a channel (from `since`, or from the position already held). */
  subscribe(channel, since = null) {
    if (this.channels.includes(channel)) return;
    this.channels.push(channel);
    if (since) this.positions.set(channel, { epoch: String(since.epoch), offset: Number(since.offset) });
    if (this._connected) this._send(this._subscribeMessage(channel));
  }

  /** Leave a channel: nothing of it is delivered after this call. Resolves once the server
   * confirmed (at once when not connected). */
  unsubscribe(channel, timeout = 10) {
    const at = this.channels.indexOf(channel);
    if (at < 0) return Promise.resolve();
    this.channels.splice(at, 1);
    this.positions.delete(channel);
    if (!this._connected) return Promise.resolve();
    return this._request({ type: "unsubscribe", channel }, `unsubscribed:${channel}`, timeout);
  }

  /** Publish (when the server allows clients to); resolves with the `published` acknowledgement. */
  publish(channel, data, timeout = 10) {
    const id = `p${++this._ids}`;
    return this._request({ type: "publish", channel, data, id }, id, timeout);
  }

  /** A client ping; resolves with the round-trip time in seconds. */
  async ping(timeout = 10) {
    const id = `c${++this._ids}`;
    const started = this.clock();
    await this._request({ type: "ping", id }, id, timeout);
    return this.clock() - started;
  }

  /** The position held in a channel ({epoch, offset}), or null. */
  position(channel) {
    const pos = this.positions.get(channel);
    return pos ? { ...pos } : null;
  }

  /** Recovery statistics: the Python client's recovery_stats() keys. */
  stats() {
    return {
      ...this.recovery.stats(),
      state: this.state,
      url: redact(this.url),
      connection: this.connectionId,
      server: this.server,
      drops: this.drops,
      messages_received: this.messagesReceived,
      duplicates_dropped: this.duplicatesDropped,
      gaps: this.gaps,
      channels_resumed: this.resumed,
      channels_resynced: this.resynced,
      messages_replayed: this.replayed,
      last_close: this.lastClose,
    };
  }

  // ---------------------------------------------------------------- the connection loop

  async _run() {
    const recovery = this.recovery;
    try {
      while (!this._closing) {
        let delay;
        try {
          delay = recovery.nextDelay();
        } catch (exc) {
          if (!(exc instanceof GiveUp)) throw exc;
          this._stop(new ClientClosed(`recovery gave up: ${exc.message}`));
          return;
        }
        if (delay > 0) {
          this._emit("reconnecting", {
            attempt: recovery.episodeAttempts + 1, delay: round(delay, 3),
            url: redact(this.urls[this._urlIndex % this.urls.length]), circuit: recovery.circuitState,
          });
          await this._sleep(delay);
          if (this._closing) return;
        }
        if (!recovery.startAttempt()) continue;
        try {
          await this._session();
        } catch (drop) {
          if (!(drop instanceof Dropped)) throw drop;
          this._connected = false;
          this._ws = null;
          if (this._closing) return;
          if (drop.final) { // 1000 ends the stream normally; the others are errors
            this._emit("disconnected", { ...this.lastClose });
            this._stop(drop.code === 1000 ? null : new ClientClosed(`closed by the server: ${drop.message}`, drop.code));
            return;
          }
          if (drop.verified) {
            this.drops += 1;
            if (drop.code === null || INSTANCE_GONE.has(drop.code)) this._rotateUrl();
            this._setState("reconnecting");
            this._emit("disconnected", { ...this.lastClose });
            recovery.lost(this._advice);
          } else {
            recovery.failed();
            this._rotateUrl();
            if (this.state === "connected") this._setState("reconnecting");
          }
          this._advice = null;
        }
      }
    } catch (exc) { // a bug must not leave the application waiting forever
      console.error("stablews client loop failed", exc);
      this._stop(new ClientClosed(`client failed: ${exc}`));
    }
  }

  _rotateUrl() {
    if (this.urls.length > 1) this._urlIndex = (this._urlIndex + 1) % this.urls.length;
  }

  /** Wait `seconds` on the client's clock (a timer may fire a little early: it is re-armed for the rest). */
  _sleep(seconds) {
    const until = this.clock() + seconds;
    return new Promise((resolve) => {
      let timer = null;
      const finish = () => { clearTimeout(timer); this._wake = null; resolve(); };
      const arm = () => {
        const left = until - this.clock();
        if (left <= 0) finish();
        else timer = setTimeout(arm, Math.max(1, left * 1000));
      };
      this._wake = finish;
      arm();
    });
  }

  _connectUrl(url) {
    if (!this.token || this.tokenIn !== "query") return url;
    const parsed = new URL(url);
    parsed.searchParams.set("token", this.token);
    return parsed.toString();
  }

  /** One connection from open to drop: rejects with Dropped (with `.verified`) when it ends. */
  _session() {
    const url = this.url = this.urls[this._urlIndex % this.urls.length];
    if (this.state === "closed") this._setState("connecting");
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new this.WebSocket(this._connectUrl(url), [SUBPROTOCOL]);
      } catch (exc) { // a malformed URL: a failed attempt, like a refused connection
        this.lastClose = { url: redact(url), code: null, reason: String(exc), verified: false };
        reject(new Dropped(String(exc), null, { verified: false }));
        return;
      }
      ws.binaryType = "arraybuffer";
      this._ws = ws;
      const clock = this.clock;
      let welcomed = false;
      let verified = false;
      let ended = false;
      let lastHeard = clock();
      let verifyBy = clock() + this.openTimeout; // the handshake and welcome deadline, then verifyTimeout
      const verifyId = `v${++this._ids}`;
      let timer = null;

      const end = (drop) => {
        if (ended) return;
        ended = true;
        if (timer !== null) clearTimeout(timer);
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        if (this._sessionEnd === end) this._sessionEnd = null;
        this._failWaiters();
        reject(drop);
      };
      const abandon = (why) => { // the peer is gone or broken: do not wait for its closing handshake
        this.lastClose = { url: redact(url), code: null, reason: why, verified };
        end(new Dropped(why, null, { verified }));
        try { ws.close(); } catch { /* already closing */ }
      };
      this._sessionEnd = end;

      // One timer per connection, re-armed only when it fires: frames just note the time.
      const check = () => {
        timer = null;
        if (ended) return;
        const now = clock();
        let deadline = welcomed ? lastHeard + this.silence : verifyBy;
        if (welcomed && !verified) deadline = Math.min(deadline, verifyBy);
        if (now >= deadline) {
          abandon(!welcomed ? "no welcome" : !verified ? "no pong to the verifying ping"
            : `server silent for ${this.silence}s`);
          return;
        }
        timer = setTimeout(check, Math.max(10, (deadline - now) * 1000));
      };
      check();

      ws.onopen = () => {
        lastHeard = clock();
        ws.send(JSON.stringify(this._hello()));
      };
      ws.onclose = (event) => {
        const code = event.code || null;
        const reason = event.reason || (code === 1006 ? "connection lost" : "");
        if (!this._closing) this.lastClose = { url: redact(url), code, reason, verified };
        const final = code !== null && FINAL_CODES.has(code) && !this._closing;
        end(new Dropped(`${code ?? ""} ${reason}`.trim(), code, { verified, final }));
      };
      ws.onmessage = (event) => {
        if (ended) return;
        lastHeard = clock();
        const frame = typeof event.data === "string" ? event.data : new TextDecoder().decode(event.data);
        try {
          for (const line of frame.split("\n")) {
            if (!line) continue;
            const msg = JSON.parse(line);
            if (msg === null || typeof msg !== "object" || Array.isArray(msg)) {
              throw new Error(`server sent a non-object message: ${line.slice(0, 80)}`);
            }
            if (ended) return; // a handler closed the client
            switch (msg.type) {
              case "message":
                this._onMessage(msg);
                break;
              case "ping":
                if (ws.readyState === 1) ws.send(`{"type":"pong","id":${JSON.stringify(msg.id ?? null)}}`);
                break;
              case "welcome":
                welcomed = true;
                verifyBy = clock() + this.verifyTimeout;
                this._onWelcome(msg, ws);
                ws.send(JSON.stringify({ type: "ping", id: verifyId }));
                break;
              case "pong":
                if (msg.id === verifyId && !verified) {
                  verified = true;
                  this._verified();
                } else this._answer(msg);
                break;
              case "subscribed":
                this._onSubscribed(msg);
                break;
              case "reconnect":
                if (typeof msg.after_ms === "number" && msg.after_ms >= 0) {
                  this._advice = Math.min(msg.after_ms / 1000, this.policy.maxDelay);
                }
                break;
              default:
                this._answer(msg);
                if (msg.type === "error") this._emit("error", msg);
            }
          }
        } catch (exc) { // bad JSON from the server: this connection cannot be trusted
          abandon(`${exc.name}: ${exc.message}`);
        }
      };
    });
  }

  _hello() {
    const hello = { type: "hello", client: { name: this.name, version: VERSION } };
    if (this.token && this.tokenIn === "hello") hello.token = this.token;
    const previous = this.traceId; // the trace of the last connection the server welcomed
    if (typeof previous === "string" && previous.length > 0 && previous.length <= 64) {
      hello.previous_trace_id = previous;
    }
    const resume = {};
    for (const [channel, pos] of this.positions) {
      if (this.channels.includes(channel)) resume[channel] = { epoch: pos.epoch, offset: pos.offset };
    }
    if (Object.keys(resume).length) hello.resume = resume;
    return hello;
  }

  _subscribeMessage(channel) {
    const message = { type: "subscribe", channel };
    const pos = this.positions.get(channel);
    if (pos) message.since = { epoch: pos.epoch, offset: pos.offset };
    return message;
  }

  _onWelcome(msg, ws) {
    this.connectionId = msg.connection ?? null;
    this.server = msg.server ?? null;
    this.traceId = msg.trace_id ?? null;
    const beat = msg.heartbeat ?? {};
    if (typeof beat.interval_ms === "number" && typeof beat.timeout_ms === "number" && beat.interval_ms > 0) {
      this.silence = (beat.interval_ms + Math.max(beat.timeout_ms, 0)) / 1000;
    }
    for (const channel of this.channels) {
      if (!this.positions.has(channel)) ws.send(JSON.stringify(this._subscribeMessage(channel)));
    }
  }

  _verified() {
    const recoveredIn = this.recovery.succeeded();
    this._connected = true;
    this._setState("connected");
    this._emit("connected", {
      url: redact(this.url), connection: this.connectionId, server: this.server, trace_id: this.traceId,
      recovered_in: recoveredIn === null ? null : round(recoveredIn, 4),
    });
  }

  _onSubscribed(msg) {
    const { channel, epoch, offset: top } = msg;
    if (typeof channel !== "string" || typeof epoch !== "string" || !Number.isInteger(top)) return;
    const held = this.positions.get(channel) ?? null;
    if (msg.recovered === true) {
      this.resumed += 1;
      this.replayed += Number(msg.replayed) || 0;
      this._emit("recovered", channel, Number(msg.replayed) || 0);
      return; // the replay that follows brings the position to the top
    }
    this.positions.set(channel, { epoch, offset: top });
    if (msg.recovered === false) {
      this.resynced += 1;
      this._resync(channel, { reason: "recovery_failed", previous: held, current: { epoch, offset: top } });
    }
  }

  _onMessage(msg) {
    const { channel, epoch, offset } = msg;
    if (typeof channel !== "string" || !Number.isInteger(offset) || !this.channels.includes(channel)) return;
    const held = this.positions.get(channel);
    if (held) {
      if (epoch === held.epoch) {
        if (offset <= held.offset) {
          this.duplicatesDropped += 1;
          return;
        }
        if (offset > held.offset + 1) {
          this.gaps += 1;
          this._resync(channel, { reason: "gap", previous: { ...held }, current: { epoch, offset } });
        }
      } else {
        this.resynced += 1;
        this._resync(channel, { reason: "new_epoch", previous: { ...held }, current: { epoch, offset } });
      }
    }
    this.positions.set(channel, { epoch, offset });
    this.messagesReceived += 1;
    this._emit("message", msg);
  }

  _resync(channel, info) {
    info.channel = channel;
    this._emit("resync", channel, info);
  }

  // ---------------------------------------------------------------- requests

  _send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) throw new ClientClosed("not connected");
    ws.send(JSON.stringify(message));
  }

  _request(message, ident, timeout) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._waiters.delete(ident);
        reject(new Error(`no answer to ${message.type} within ${timeout}s`));
      }, timeout * 1000);
      this._waiters.set(ident, {
        resolve: (value) => { clearTimeout(timer); resolve(value); },
        reject: (error) => { clearTimeout(timer); reject(error); },
      });
      try {
        this._send(message);
      } catch (exc) {
        this._waiters.delete(ident);
        clearTimeout(timer);
        reject(exc);
      }
    });
  }

  /** Settle the request an `unsubscribed`, `pong`, `published` or `error` answers. */
  _answer(msg) {
    let ident;
    if (msg.type === "unsubscribed") ident = `unsubscribed:${msg.channel}`;
    else if (msg.type === "error" && msg.ref === "unsubscribe") {
      // Not subscribed (its subscribe had failed): the wanted end state. Answers are in order.
      for (const [key, waiter] of this._waiters) {
        if (key.startsWith("unsubscribed:")) {
          this._waiters.delete(key);
          waiter.resolve(msg);
          return;
        }
      }
      return;
    } else ident = msg.type === "pong" || msg.type === "published" ? msg.id : msg.ref;
    const waiter = typeof ident === "string" ? this._waiters.get(ident) : undefined;
    if (!waiter) return;
    this._waiters.delete(ident);
    if (msg.type === "error") waiter.reject(new RequestFailed(String(msg.code), String(msg.message)));
    else waiter.resolve(msg);
  }

  _failWaiters() {
    const waiters = [...this._waiters.values()];
    this._waiters.clear();
    for (const waiter of waiters) waiter.reject(new ClientClosed("connection lost before the answer"));
  }

  // ---------------------------------------------------------------- events and state

  _emit(event, ...args) {
    for (const handler of [...this._handlers[event]]) {
      try {
        const result = handler(...args);
        if (result && typeof result.catch === "function") {
          result.catch((exc) => console.error(`stablews client: ${event} handler failed`, exc));
        }
      } catch (exc) { // an application bug must not drop the connection
        console.error(`stablews client: ${event} handler failed`, exc);
      }
    }
  }

  _setState(state) {
    if (state !== this.state) {
      this.state = state;
      this._emit("state", state);
    }
  }

  _stop(error) {
    this.error = error;
    this._connected = false;
    this._setState("closed");
  }
}

function round(value, digits) {
  const scale = 10 ** digits;
  return Math.round(value * scale) / scale;
}

/** `url` without credentials: user info and a `token` query parameter. */
export function redact(url) {
  try {
    const parsed = new URL(url);
    let changed = false;
    if (parsed.username || parsed.password) {
      parsed.username = "REDACTED";
      parsed.password = "REDACTED";
      changed = true;
    }
    if (parsed.searchParams.has("token")) {
      parsed.searchParams.set("token", "REDACTED");
      changed = true;
    }
    return changed ? parsed.toString() : url;
  } catch {
    return url;
  }
}
