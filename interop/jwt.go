package main

import (
	"context"
	"crypto/x509"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ce46d8f2/hsm/hsmjwt"
	"github.com/golang-jwt/jwt/v5"
)

//go:embed jwtverify.mjs
var jwtVerifyScript []byte

// The JWS algorithms of hsmjwt, each with the token key it signs with and
// another key of the same type.
var jwtCases = []struct {
	m          *hsmjwt.SigningMethod
	key, other string
}{
	{hsmjwt.ES256, "p256", "p256-b"},
	{hsmjwt.ES384, "p384", "p384-b"},
	{hsmjwt.ES512, "p521", "p521-b"},
	{hsmjwt.RS256, "rsa", "rsa-b"},
	{hsmjwt.RS384, "rsa", "rsa-b"},
	{hsmjwt.RS512, "rsa", "rsa-b"},
	{hsmjwt.PS256, "rsa", "rsa-b"},
	{hsmjwt.PS384, "rsa", "rsa-b"},
	{hsmjwt.PS512, "rsa", "rsa-b"},
	{hsmjwt.EdDSA, "ed25519", "ed25519-b"},
}

const jwtIssuer = "hsm-interop"

// A jwtInput is one token for jose, with the public key to verify it under.
type jwtInput struct {
	ID     string `json:"id"`
	Alg    string `json:"alg"`
	SPKI   string `json:"spki"`
	Token  string `json:"token"`
	Issuer string `json:"iss"`

	name   string // for the report
	sub    string // the subject jose must read back
	accept bool
}

// jwtChecks signs a JWT with every algorithm of hsmjwt on token keys, and
// has npm's jose verify each under the key's public key: it must accept
// it, and refuse the same token with one bit of its signature flipped and
// the token signed by another key of the same type.
func jwtChecks(r *runner) {
	var inputs []*jwtInput
	for _, c := range jwtCases {
		alg := c.m.Alg()
		pub, err := x509.MarshalPKIXPublicKey(r.key(c.key).Public())
		if err != nil {
			r.check("JWT", alg, "jose", true, failed(err))
			continue
		}
		spki := string(pemOf("PUBLIC KEY", pub))
		sub := "signed with " + alg
		good, err := r.jwt(c.m, c.key, sub)
		if err != nil {
			r.check("JWT", alg, "jose", true, failed(err))
			continue
		}
		other, err := r.jwt(c.m, c.other, sub)
		if err != nil {
			r.check("JWT", alg, "jose", true, failed(err))
			continue
		}
		for _, in := range []*jwtInput{
			{ID: alg, name: alg, Token: good, accept: true},
			{ID: alg + "-corrupt", name: alg + ", one bit of the signature flipped", Token: corrupt(good)},
			{ID: alg + "-other", name: alg + ", signed by another key", Token: other},
		} {
			in.Alg, in.SPKI, in.Issuer, in.sub = alg, spki, jwtIssuer, sub
			inputs = append(inputs, in)
		}
	}
	if len(inputs) == 0 {
		return
	}
	out, took, err := r.jose(inputs)
	if err != nil {
		for _, in := range inputs {
			r.check("JWT", in.name, "jose", in.accept, failed(err))
		}
		return
	}
	fmt.Printf("jose: Node.js %s, jose %s: %d tokens verified in %v\n", out.Node, out.Jose, len(inputs), took.Round(time.Millisecond))
	for _, in := range inputs {
		res, ok := out.byID[in.ID]
		r.check("JWT", in.name, "jose", in.accept, func(context.Context) (bool, string, error) {
			switch {
			case !ok:
				return false, "", errors.New("no result from jose")
			case res.OK && (res.Alg != in.Alg || res.Sub != in.sub):
				return true, "", fmt.Errorf("verified, but read alg %q sub %q, want %q %q", res.Alg, res.Sub, in.Alg, in.sub)
			case res.OK:
				return true, "verified, alg " + res.Alg, nil
			case res.Code == "ERR_JWS_SIGNATURE_VERIFICATION_FAILED":
				return false, res.Code, nil
			}
			return false, "", fmt.Errorf("refused for another reason than the signature: %s: %s", res.Code, res.Message)
		})
	}
}

// jwt signs a token with hsmjwt's method m and the durable key label, the
// way an application does: jwt.NewWithClaims and SignedString.
func (r *runner) jwt(m *hsmjwt.SigningMethod, label, sub string) (string, error) {
	now := time.Now()
	claims := jwt.RegisteredClaims{
		Issuer:    jwtIssuer,
		Subject:   sub,
		IssuedAt:  jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(time.Hour)),
	}
	return jwt.NewWithClaims(m, claims).SignedString(r.key(label))
}

// corrupt flips one bit in the middle of the token's signature. It
// changes the decoded bytes, not the encoding: flipping the last
// character of the base64url text can leave the bytes as they were.
func corrupt(token string) string {
	i := strings.LastIndexByte(token, '.')
	sig, err := base64.RawURLEncoding.DecodeString(token[i+1:])
	if err != nil || len(sig) == 0 {
		panic(fmt.Sprintf("interop: a token without a signature: %q", token))
	}
	sig[len(sig)/2] ^= 0x01
	return token[:i+1] + base64.RawURLEncoding.EncodeToString(sig)
}

// joseOutput is what jwtverify.mjs writes.
type joseOutput struct {
	Node    string       `json:"node"`
	Jose    string       `json:"jose"`
	Results []joseResult `json:"results"`
	byID    map[string]joseResult
}

// joseResult is jose's verdict on one token.
type joseResult struct {
	ID      string `json:"id"`
	OK      bool   `json:"ok"`
	Alg     string `json:"alg"`
	Sub     string `json:"sub"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

// jose runs jwtverify.mjs with Node.js on inputs, in the directory given
// by -jose.
func (r *runner) jose(inputs []*jwtInput) (*joseOutput, time.Duration, error) {
	if r.joseDir == "" {
		return nil, 0, errors.New("no -jose directory: install jose with npm (scripts/interop.sh does)")
	}
	dir, err := filepath.Abs(r.joseDir)
	if err != nil {
		return nil, 0, err
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "jose", "package.json")); err != nil {
		return nil, 0, fmt.Errorf("jose is not installed in %s: %w", dir, err)
	}
	data, err := json.Marshal(inputs)
	if err != nil {
		return nil, 0, err
	}
	in, err := r.write("jwt.json", data)
	if err != nil {
		return nil, 0, err
	}
	script := filepath.Join(dir, "hsm-interop-jwtverify.mjs")
	if err := os.WriteFile(script, jwtVerifyScript, 0o600); err != nil {
		return nil, 0, err
	}
	defer os.Remove(script)
	start := time.Now()
	out, code, err := r.exec(r.ctx, "", "node", script, in)
	took := time.Since(start)
	if err != nil {
		return nil, took, err
	}
	if code != 0 {
		return nil, took, fmt.Errorf("node: exit %d: %s", code, lastLines(out, 5))
	}
	var res joseOutput
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return nil, took, fmt.Errorf("node's output: %w: %s", err, lastLines(out, 5))
	}
	res.byID = make(map[string]joseResult, len(res.Results))
	for _, x := range res.Results {
		res.byID[x.ID] = x
	}
	return &res, took, nil
}
