import { assertEquals, assertThrows } from "./support/assert.ts";
import { formatSize, MAX_LAYERS, parseSize, parseSizeList } from "../lib/sizes.ts";

Deno.test("parseSize() reads binary units case-insensitively", async (t) => {
  const cases: [string, number][] = [
    ["1", 1],
    ["512B", 512],
    ["10KB", 10 * 1024],
    ["10kb", 10 * 1024],
    ["10KiB", 10 * 1024],
    ["100MB", 100 * 1024 ** 2],
    ["2gib", 2 * 1024 ** 3],
    ["1TB", 1024 ** 4],
    ["1.5MB", 1572864],
    ["0.5KB", 512],
    [" 7MB ", 7 * 1024 ** 2],
    ["10 MB", 10 * 1024 ** 2],
  ];
  for (const [text, bytes] of cases) {
    await t.step(`'${text}' is ${bytes} bytes`, () => assertEquals(parseSize(text), bytes));
  }
});

Deno.test("parseSize() rejects bad sizes with the reason", async (t) => {
  const cases: [
    string,
    ErrorConstructor | RangeErrorConstructor | SyntaxErrorConstructor,
    string,
  ][] = [
    ["", SyntaxError, "empty"],
    ["0", RangeError, "more than 0"],
    ["0KB", RangeError, "more than 0"],
    ["-1KB", RangeError, "negative"],
    ["NaN", SyntaxError, "expected a number"],
    ["Infinity", SyntaxError, "expected a number"],
    ["1.0000001KB", RangeError, "whole number of bytes"],
    ["0.3B", RangeError, "whole number of bytes"],
    ["10XB", SyntaxError, "unit must be one of B, KB, MB, GB, TB"],
    ["1 0MB", SyntaxError, "expected a number"],
    ["1e3KB", SyntaxError, "expected a number"],
    ["99999999TB", RangeError, "larger than"],
  ];
  for (const [text, type, why] of cases) {
    await t.step(`'${text}' fails: ${why}`, () => {
      assertThrows(() => parseSize(text), type, why);
    });
  }
});

Deno.test("parseSizeList() gives one size per entry and refuses empty entries", async (t) => {
  await t.step("three layers", () => {
    assertEquals(parseSizeList("1GB,512MB,10KB"), [1024 ** 3, 512 * 1024 ** 2, 10240]);
  });
  for (const text of ["", ",", "1KB,", ",1KB", "1KB,,2KB"]) {
    await t.step(`'${text}' is refused`, () => {
      assertThrows(() => parseSizeList(text), SyntaxError, "empty");
    });
  }
  await t.step(`more than ${MAX_LAYERS} layers is refused`, () => {
    parseSizeList(Array(MAX_LAYERS).fill("1KB").join(","));
    assertThrows(
      () => parseSizeList(Array(MAX_LAYERS + 1).fill("1KB").join(",")),
      RangeError,
      "at most 127",
    );
  });
});

Deno.test("formatSize() names files without spaces", async (t) => {
  const cases: [number, string][] = [
    [1024 ** 3, "1.00GB"],
    [512 * 1024 ** 2, "512.00MB"],
    [10240, "10.00KB"],
    [100, "100B"],
    [1024 ** 3 + 1, "1.00GB"],
    [1536, "1.50KB"],
  ];
  for (const [bytes, text] of cases) {
    await t.step(`${bytes} → ${text}`, () => assertEquals(formatSize(bytes), text));
  }
});
