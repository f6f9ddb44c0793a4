// Verifies the JWTs that the interop program (main.go) made with hsmjwt,
// with npm's jose, as any relying party would: the public key imported
// from its SPKI PEM for the token's algorithm, jwtVerify with that one
// algorithm allowed and the issuer checked. Reads the cases from the JSON
// file named by the first argument and writes the results as JSON to
// stdout; the Go program decides what passes. The program copies this
// file next to node_modules/jose so that `import 'jose'` finds it.
import { readFileSync } from 'node:fs';
import * as jose from 'jose';

const cases = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const pkg = JSON.parse(readFileSync(new URL('./node_modules/jose/package.json', import.meta.url), 'utf8'));
const results = [];
for (const c of cases) {
  try {
    const key = await jose.importSPKI(c.spki, c.alg);
    const { payload, protectedHeader } = await jose.jwtVerify(c.token, key, { algorithms: [c.alg], issuer: c.iss });
    results.push({ id: c.id, ok: true, alg: protectedHeader.alg, sub: payload.sub });
  } catch (e) {
    results.push({ id: c.id, ok: false, code: e.code ?? '', message: String(e.message ?? e) });
  }
}
process.stdout.write(JSON.stringify({ node: process.version, jose: pkg.version, results }) + '\n');
