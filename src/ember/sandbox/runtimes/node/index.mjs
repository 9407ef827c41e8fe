// ember's runtime client for nodejs18.x, nodejs20.x and nodejs22.x: the Lambda Runtime API loop in plain
// Node (no dependencies), run as `node [memory flags] index.mjs` with the function's environment
// (ember.sandbox.runtimes builds the command; docs/decisions/0009-nodejs-runtime.md says why ember's own).
//
// What it does, as Lambda's Node.js runtimes do:
//   - resolves _HANDLER ("dir/sub/file.export.nested"): `file` under LAMBDA_TASK_ROOT/dir/sub as file.js
//     (CommonJS, or ESM when the nearest package.json says "type": "module"), file.mjs (ESM), file.cjs
//     (CommonJS), else by Node's own resolution (node_modules, NODE_PATH); init failures go to /init/error
//     as Runtime.ImportModuleError, Runtime.HandlerNotFound, Runtime.MalformedHandlerName or
//     Runtime.UserCodeSyntaxError (or the thrown error's own name);
//   - calls handler(event, context, callback): a returned promise's outcome is the result; a callback's
//     success waits for the event loop to be empty while context.callbackWaitsForEmptyEventLoop is true;
//     context.done/succeed/fail answer at once;
//   - answers errors as {errorType, errorMessage, trace}, sets _X_AMZN_TRACE_ID per invocation from
//     Lambda-Runtime-Trace-Id, and writes console output as `time\trequestId\tLEVEL\tmessage` lines.
import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";
import util from "node:util";

const require = createRequire(import.meta.url);
const env = process.env;
const [API_HOST, API_PORT] = (env.AWS_LAMBDA_RUNTIME_API || "127.0.0.1:9001").split(":");
const BASE = "/2018-06-01/runtime";
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

// ------------------------------------------------------------------ the Runtime API

async function call(method, urlPath, body, headers) {
  try {
    return await request(method, urlPath, body, headers);
  } catch (err) {
    // the kept-alive connection was closed by ember while idle (a long invocation): once more, anew
    if (!err.reusedSocket || (err.code !== "ECONNRESET" && err.code !== "EPIPE")) throw err;
    return request(method, urlPath, body, headers);
  }
}

function request(method, urlPath, body, headers) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { agent, host: API_HOST, port: API_PORT, method, path: BASE + urlPath, headers, noDelay: true },
      (res) => {
        const chunks = [];
        res.on("data", (chunk) => chunks.push(chunk));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on("error", reject);
      },
    );
    req.on("error", (err) => {
      err.reusedSocket = req.reusedSocket;
      reject(err);
    });
    req.end(body);
  });
}

function post(urlPath, body, errorType) {
  const headers = { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) };
  if (errorType) headers["Lambda-Runtime-Function-Error-Type"] = errorType;
  return call("POST", urlPath, body, headers);
}

// ------------------------------------------------------------------ errors and logs

class RuntimeError extends Error {
  constructor(name, message, cause) {
    super(message);
    this.name = name;
    if (cause && cause.stack) this.stack = `${name}: ${message}\n${cause.stack.split("\n").slice(1).join("\n")}`;
  }
}

function errorShape(error) {
  try {
    if (util.types.isNativeError(error) || (error instanceof Object && typeof error.stack === "string")) {
      return {
        errorType: String(error.name || error.constructor?.name || "Error"),
        errorMessage: String(error.message ?? ""),
        trace: String(error.stack ?? "").split("\n"),
      };
    }
    return { errorType: typeof error, errorMessage: String(error), trace: [] };
  } catch {
    return {
      errorType: "handled",
      errorMessage:
        "callback called with Error argument, but there was a problem while retrieving one or more of its message, name, and stack",
      trace: [],
    };
  }
}

let requestId = "undefined"; // the invocation whose output this is (Lambda writes "undefined" during init)
const LEVELS = { log: "INFO", info: "INFO", warn: "WARN", error: "ERROR", debug: "DEBUG", trace: "TRACE" };
for (const [method, level] of Object.entries(LEVELS)) {
  console[method] = (...args) => {
    let message = util.format(...args);
    if (method === "trace") message = `Trace: ${message}\n${new Error().stack.split("\n").slice(2).join("\n")}`;
    // one event per call, as in CloudWatch: the message's own newlines become carriage returns
    process.stdout.write(`${new Date().toISOString()}\t${requestId}\t${level}\t${message.replace(/\n/g, "\r")}\n`);
  };
}

function logError(label, shape) {
  console.error(label, "\t" + JSON.stringify({ errorType: shape.errorType, errorMessage: shape.errorMessage, stack: shape.trace }));
}

// ------------------------------------------------------------------ the handler

async function loadHandler() {
  const full = env._HANDLER || "";
  const taskRoot = env.LAMBDA_TASK_ROOT || process.cwd();
  if (full.includes("..")) throw new RuntimeError("Runtime.MalformedHandlerName", "'..' is not allowed in handler name");
  const base = path.basename(full);
  const moduleRoot = full.slice(0, full.length - base.length);
  const match = /^([^.]*)\.(.*)$/.exec(base);
  if (!match) throw new RuntimeError("Runtime.MalformedHandlerName", "Bad handler");
  const [, moduleName, exportPath] = match;
  let loaded;
  try {
    loaded = await loadModule(path.resolve(taskRoot, moduleRoot), moduleName, taskRoot);
  } catch (err) {
    if (err instanceof SyntaxError) throw new RuntimeError("Runtime.UserCodeSyntaxError", String(err), err);
    if (err && (err.code === "MODULE_NOT_FOUND" || err.code === "ERR_MODULE_NOT_FOUND")) {
      throw new RuntimeError("Runtime.ImportModuleError", String(err), err);
    }
    throw err;
  }
  const handler = exportPath.split(".").reduce((obj, key) => (obj == null ? undefined : obj[key]), loaded);
  if (handler === undefined) throw new RuntimeError("Runtime.HandlerNotFound", `${full} is undefined or not exported`);
  if (typeof handler !== "function") throw new RuntimeError("Runtime.HandlerNotFound", `${full} is not a function`);
  return handler;
}

async function loadModule(dir, name, taskRoot) {
  const stem = path.join(dir, name);
  if (fs.existsSync(stem)) return require(stem); // extensionless: a file, or a directory (its main or index.js)
  const esm = typeModule(dir);
  if (isFile(`${stem}.js`)) return esm ? import(pathToFileURL(`${stem}.js`).href) : requireOrImport(`${stem}.js`);
  if (isFile(`${stem}.mjs`)) return import(pathToFileURL(`${stem}.mjs`).href);
  if (isFile(`${stem}.cjs`)) return require(`${stem}.cjs`);
  return require(require.resolve(name, { paths: [dir, taskRoot] })); // node_modules, NODE_PATH
}

async function requireOrImport(file) {
  try {
    return require(file);
  } catch (err) {
    if (err && err.code === "ERR_REQUIRE_ESM") return import(pathToFileURL(file).href);
    throw err;
  }
}

function isFile(p) {
  try {
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

function typeModule(dir) {
  for (let d = dir; ; d = path.dirname(d)) {
    try {
      return JSON.parse(fs.readFileSync(path.join(d, "package.json"), "utf8")).type === "module";
    } catch (err) {
      if (err.code !== "ENOENT" && err.code !== "ENOTDIR") return false; // unreadable or not JSON: CommonJS
    }
    if (d === path.dirname(d)) return false;
  }
}

// ------------------------------------------------------------------ invocations

let onEmptyLoop = null; // what to do when the event loop empties (a callback's success, waiting for it)
process.on("beforeExit", () => {
  const action = onEmptyLoop;
  onEmptyLoop = null;
  if (action) action();
});

let current = null; // {id, answered} of the running invocation

function answer(inv, error, result) {
  if (inv.answered) return;
  inv.answered = true;
  onEmptyLoop = null;
  if (error !== undefined && error !== null) {
    const shape = errorShape(error);
    logError("Invoke Error", shape);
    inv.finish(post(`/invocation/${inv.id}/error`, JSON.stringify(shape), shape.errorType));
    return;
  }
  let body;
  try {
    body = JSON.stringify(result === undefined ? null : result);
  } catch (err) {
    answer({ ...inv, answered: false }, err);
    return;
  }
  inv.finish(post(`/invocation/${inv.id}/response`, body));
}

function invoke(handler, res) {
  const h = res.headers;
  const id = h["lambda-runtime-aws-request-id"];
  const deadline = Number(h["lambda-runtime-deadline-ms"]);
  if (h["lambda-runtime-trace-id"]) env._X_AMZN_TRACE_ID = h["lambda-runtime-trace-id"];
  else delete env._X_AMZN_TRACE_ID;
  requestId = id;
  return new Promise((resolve) => {
    const inv = { id, answered: false, finish: (posted) => posted.then(resolve, resolve) };
    current = inv;
    let waits = true;
    const callback = (error, result) => {
      if (inv.answered) return;
      if (error === undefined || error === null) {
        if (waits) {
          onEmptyLoop = () => setImmediate(() => answer(inv, null, result));
          return;
        }
      }
      answer(inv, error, result);
    };
    const context = {
      get callbackWaitsForEmptyEventLoop() {
        return waits;
      },
      set callbackWaitsForEmptyEventLoop(value) {
        waits = Boolean(value);
      },
      functionName: env.AWS_LAMBDA_FUNCTION_NAME,
      functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
      invokedFunctionArn: h["lambda-runtime-invoked-function-arn"],
      memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
      awsRequestId: id,
      logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
      logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
      clientContext: parseHeader(h["lambda-runtime-client-context"]),
      identity: parseHeader(h["lambda-runtime-cognito-identity"]),
      getRemainingTimeInMillis: () => deadline - Date.now(),
      done: (error, result) => answer(inv, error, result),
      succeed: (result) => answer(inv, null, result),
      fail: (error) => answer(inv, error ?? "handled"),
    };
    // a handler that neither answers nor leaves anything to wait for: Lambda answers null
    onEmptyLoop = () => answer(inv, null, undefined);
    let event;
    try {
      event = JSON.parse(res.body.length ? res.body.toString("utf8") : "null");
    } catch (err) {
      answer(inv, err);
      return;
    }
    try {
      const out = handler(event, context, callback);
      if (out && typeof out.then === "function") {
        out.then(
          (result) => answer(inv, null, result),
          (error) => answer(inv, error ?? "handled"),
        );
      }
    } catch (err) {
      answer(inv, err);
    }
  });
}

function parseHeader(value) {
  if (!value) return undefined;
  try {
    return JSON.parse(value);
  } catch {
    return undefined;
  }
}

// ------------------------------------------------------------------ failures outside a handler's answer

async function fatal(shape, code) {
  // an invocation running: its error, then exit (the sandbox is replaced); else init failed
  logError("Uncaught Exception", shape);
  try {
    if (current && !current.answered) {
      current.answered = true;
      await post(`/invocation/${current.id}/error`, JSON.stringify(shape), shape.errorType);
    } else if (!current) {
      await post("/init/error", JSON.stringify(shape), shape.errorType);
    }
  } finally {
    process.exit(code);
  }
}

process.on("uncaughtException", (err) => fatal(errorShape(err), 129));
process.on("unhandledRejection", (reason) => {
  const shape = errorShape(reason);
  const message = util.types.isNativeError(reason) ? `${reason.name}: ${reason.message}` : String(reason);
  fatal({ errorType: "Runtime.UnhandledPromiseRejection", errorMessage: message, trace: shape.trace }, 128);
});

// ------------------------------------------------------------------ the loop

let handler;
try {
  handler = await loadHandler();
} catch (err) {
  await fatal(errorShape(err), 129);
}
for (;;) {
  const res = await call("GET", "/invocation/next");
  if (res.status !== 200) {
    console.error(`Runtime API /next answered ${res.status}: ${res.body.toString()}`);
    process.exit(1);
  }
  await invoke(handler, res);
  current = null;
  requestId = "undefined";
}
