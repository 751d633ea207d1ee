#!/usr/bin/env node
// Generates src/generated/api.ts from ../../api/openapi.json: one exported TypeScript type
// per schema in `components.schemas`. No network, no third-party generator.
//
//   node scripts/gen-types.mjs            writes src/generated/api.ts
//   node scripts/gen-types.mjs --check    exits 1 when the committed file is not up to date
//
// The unit test `spec.test.ts` imports `generate` and compares its output with the committed
// file, so the SDK's types cannot drift from the API document.
//
// What it maps (the subset of JSON Schema / OpenAPI 3.1 that the ember document uses):
// - `$ref: "#/components/schemas/X"` -> `X`
// - `oneOf` / `anyOf` -> a union (sibling `properties` of a oneOf are value refinements such
//   as `minimum`, not fields, and are ignored)
// - `allOf` -> an intersection of its structural members; members that are only
//   `if`/`then`/`else` conditionals are validation rules and are left out
// - `enum` / `const` -> literal unions
// - `type: ["x", "null"]` -> `X | null`
// - objects: `required` fields are plain, the others optional (`?`); `additionalProperties`
//   with a schema -> an index signature (`{ [key: string]: T }`); `false` -> closed
// - arrays -> `T[]`; integer and number -> `number`

import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const SPEC_PATH = join(here, "..", "..", "..", "api", "openapi.json");
export const OUTPUT_PATH = join(here, "..", "src", "generated", "api.ts");

const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;

function refName(ref) {
  const prefix = "#/components/schemas/";
  if (typeof ref !== "string" || !ref.startsWith(prefix)) {
    throw new Error(`unsupported $ref ${JSON.stringify(ref)}`);
  }
  return ref.slice(prefix.length);
}

function literal(value) {
  return JSON.stringify(value);
}

function union(parts) {
  const unique = [];
  for (const p of parts) {
    if (!unique.includes(p)) unique.push(p);
  }
  if (unique.length === 0) return "never";
  // `null` last reads best: `string | null`.
  unique.sort((a, b) => Number(a === "null") - Number(b === "null"));
  return unique.join(" | ");
}

/** Parenthesises a union or intersection (at the top level) for use inside another type. */
function paren(type) {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < type.length; i++) {
    const c = type[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "{" || c === "(" || c === "[") depth++;
    else if (c === "}" || c === ")" || c === "]") depth--;
    else if (depth === 0 && (c === "|" || c === "&")) return `(${type})`;
  }
  return type;
}

function indent(text, pad) {
  return text
    .split("\n")
    .map((line) => (line.length ? pad + line : line))
    .join("\n");
}

function doc(description, pad) {
  if (typeof description !== "string" || description.trim() === "") return "";
  const lines = description.replace(/\*\//g, "*\\/").trim().split("\n");
  if (lines.length === 1) return `${pad}/** ${lines[0]} */\n`;
  return `${pad}/**\n${lines.map((l) => `${pad} *${l ? " " + l : ""}`).join("\n")}\n${pad} */\n`;
}

/** Whether an `allOf` member only states a condition (if/then/else) and adds no shape. */
function conditionalOnly(schema) {
  const keys = Object.keys(schema).filter((k) => k !== "description");
  return keys.length > 0 && keys.every((k) => k === "if" || k === "then" || k === "else");
}

function isObjectSchema(schema) {
  const t = schema.type;
  return (
    t === "object" ||
    (Array.isArray(t) && t.includes("object")) ||
    (t === undefined && (schema.properties !== undefined || schema.additionalProperties !== undefined))
  );
}

function objectType(schema) {
  const props = schema.properties ?? {};
  const required = new Set(schema.required ?? []);
  const lines = [];
  for (const [name, prop] of Object.entries(props)) {
    const key = IDENT.test(name) ? name : literal(name);
    const optional = required.has(name) ? "" : "?";
    lines.push(doc(prop.description, "") + `${key}${optional}: ${typeOf(prop)};`);
  }
  const extra = schema.additionalProperties;
  if (extra !== undefined && extra !== false) {
    const value = extra === true ? "unknown" : typeOf(extra);
    lines.push(`[key: string]: ${value};`);
  } else if (extra === undefined && Object.keys(props).length === 0) {
    lines.push("[key: string]: unknown;");
  }
  if (lines.length === 0) return "{}";
  return `{\n${indent(lines.join("\n"), "  ")}\n}`;
}

/** The TypeScript type of a schema (not a named declaration). */
export function typeOf(schema) {
  if (schema === true || schema === undefined) return "unknown";
  if (schema === false) return "never";
  if (schema.$ref !== undefined) return refName(schema.$ref);
  const alternatives = schema.oneOf ?? schema.anyOf;
  if (alternatives !== undefined) {
    return union(alternatives.map((s) => typeOf(s)));
  }
  if (schema.allOf !== undefined) {
    const parts = schema.allOf.filter((s) => !conditionalOnly(s)).map((s) => paren(typeOf(s)));
    if (schema.properties !== undefined) parts.push(objectType({ ...schema, allOf: undefined }));
    return parts.length ? parts.join(" & ") : "unknown";
  }
  if (schema.const !== undefined) return literal(schema.const);
  const types = Array.isArray(schema.type) ? schema.type : schema.type === undefined ? [] : [schema.type];
  if (schema.enum !== undefined) {
    const values = schema.enum.map(literal);
    if (types.includes("null")) values.push("null");
    return union(values);
  }
  if (types.length === 0) {
    return isObjectSchema(schema) ? objectType(schema) : "unknown";
  }
  return union(
    types.map((t) => {
      switch (t) {
        case "null":
          return "null";
        case "string":
          return "string";
        case "integer":
        case "number":
          return "number";
        case "boolean":
          return "boolean";
        case "array":
          return `${paren(typeOf(schema.items))}[]`;
        case "object":
          return objectType(schema);
        default:
          throw new Error(`unsupported type ${JSON.stringify(t)}`);
      }
    }),
  );
}

/** One exported declaration: an interface for a plain object schema, else a type alias. */
function declaration(name, schema) {
  const head = doc(schema.description, "");
  const plainObject =
    schema.$ref === undefined &&
    schema.oneOf === undefined &&
    schema.anyOf === undefined &&
    (schema.allOf === undefined || schema.allOf.every(conditionalOnly)) &&
    schema.enum === undefined &&
    (schema.type === "object" || (schema.type === undefined && schema.properties !== undefined));
  if (plainObject) {
    return `${head}export interface ${name} ${objectType(schema)}\n`;
  }
  return `${head}export type ${name} = ${typeOf(schema)};\n`;
}

/** The whole generated module for an OpenAPI document (parsed JSON). */
export function generate(spec) {
  const schemas = spec?.components?.schemas;
  if (schemas === undefined || typeof schemas !== "object") {
    throw new Error("the document has no components.schemas");
  }
  const names = Object.keys(schemas).sort();
  const out = [
    "// Generated by scripts/gen-types.mjs from api/openapi.json: do not edit.",
    "// Run `npm run gen-types` after the API document changes.",
    `// API: ${spec.info?.title ?? "?"} ${spec.info?.version ?? "?"}`,
    "",
    "/* eslint-disable */",
    "",
  ];
  for (const name of names) {
    if (!IDENT.test(name)) throw new Error(`schema name ${JSON.stringify(name)} is not an identifier`);
    out.push(declaration(name, schemas[name]));
  }
  out.push(`/** Every schema name in the document. */`);
  out.push(`export type SchemaName =\n${names.map((n) => `  | ${literal(n)}`).join("\n")};\n`);
  return out.join("\n");
}

export function generateFromFile(path = SPEC_PATH) {
  return generate(JSON.parse(readFileSync(path, "utf8")));
}

const invoked = process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1];
if (invoked) {
  const text = generateFromFile();
  if (process.argv.includes("--check")) {
    const committed = readFileSync(OUTPUT_PATH, "utf8");
    if (committed !== text) {
      console.error(`${OUTPUT_PATH} is out of date: run npm run gen-types`);
      process.exit(1);
    }
    console.log(`${OUTPUT_PATH} is up to date`);
  } else {
    writeFileSync(OUTPUT_PATH, text);
    console.log(`wrote ${OUTPUT_PATH}`);
  }
}
