import { assertEquals, assertThrows } from "./support/assert.ts";
import { formatReference, parseReference, registryEndpoint } from "../lib/reference.ts";

Deno.test("parseReference() follows docker's defaults", async (t) => {
  const cases: [string, string, string, string][] = [
    ["test/core:v1", "docker.io", "test/core", "v1"],
    ["busybox", "docker.io", "library/busybox", "latest"],
    ["docker.io/user/img", "docker.io", "user/img", "latest"],
    ["index.docker.io/user/img:1", "docker.io", "user/img", "1"],
    ["localhost/t/n:1", "localhost", "t/n", "1"],
    ["localhost:5000/t/n:1", "localhost:5000", "t/n", "1"],
    ["127.0.0.1:5000/t/p:1", "127.0.0.1:5000", "t/p", "1"],
    ["ghcr.io/org/img:tag", "ghcr.io", "org/img", "tag"],
    [
      "123456789012.dkr.ecr.us-east-1.amazonaws.com/perf/big:v1",
      "123456789012.dkr.ecr.us-east-1.amazonaws.com",
      "perf/big",
      "v1",
    ],
    ["a/b__c/d-e.f:V_1.2-x", "docker.io", "a/b__c/d-e.f", "V_1.2-x"],
    [`r:${"t".repeat(128)}`, "docker.io", "library/r", "t".repeat(128)],
  ];
  for (const [text, registry, repository, tag] of cases) {
    await t.step(text.slice(0, 60), () => {
      const ref = parseReference(text);
      assertEquals([ref.registry, ref.repository, ref.tag], [registry, repository, tag]);
    });
  }
  await t.step("formatReference() adds :latest", () => {
    assertEquals(formatReference(parseReference("x/y")), "x/y:latest");
  });
  await t.step("registryEndpoint() maps docker.io to registry-1.docker.io", () => {
    assertEquals(registryEndpoint("docker.io"), "registry-1.docker.io");
    assertEquals(registryEndpoint("ghcr.io"), "ghcr.io");
  });
});

Deno.test("parseReference() rejects what docker rejects", async (t) => {
  const cases: [string, string][] = [
    ["", "empty"],
    ["UPPER:tag", "lowercase"],
    ["a:b:c", "more than one ':'"],
    ["repo@sha256:" + "a".repeat(64), "digests"],
    ["repo:", "tag must be"],
    ["repo:-x", "tag must be"],
    [`repo:${"t".repeat(129)}`, "tag must be"],
    ["repo:t@g", "digests"],
    ["a//b", "empty"],
    ["/a", "empty"],
    ["a/", "empty"],
    ["a/-b", "must be lowercase letters"],
    ["a/b_", "must be lowercase letters"],
    ["-bad.host/x", "registry"],
    ["x".repeat(256), "longer than 255"],
  ];
  for (const [text, why] of cases) {
    await t.step(`'${text.slice(0, 40)}' fails: ${why}`, () => {
      assertThrows(() => parseReference(text), SyntaxError, why);
    });
  }
});
