package compare_test

// Benchmarks side by side, on the same SoftHSM2 keys: raw miekg/pkcs11 (one
// session per goroutine, C_SignInit + C_Sign), crypto11 v1.6.2, and hsm;
// directly on SoftHSM and through p11-kit remoting (every call a socket
// round trip). make bench runs them and writes the table in docs/performance.md.

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha1"
	"testing"

	"github.com/ThalesGroup/crypto11"
	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// benchMech is one operation: a signature with opts, or, when dec is set,
// a decryption with dec of the ciphertext input.
type benchMech struct {
	name  string
	label string
	id    byte
	opts  crypto.SignerOpts
	input []byte
	mech  func() []*pkcs11.Mechanism // for raw miekg/pkcs11
	dec   crypto.DecrypterOpts
}

// sha256Prefix is the DigestInfo prefix of a SHA-256 digest: raw
// miekg/pkcs11's PKCS #1 v1.5 signature (CKM_RSA_PKCS) signs prefix and
// digest.
var sha256Prefix = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}

func benchMechs() []benchMech {
	pss := &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}
	return []benchMech{
		{"ECDSA-P256", "ec", 1, crypto.SHA256, digest32[:], func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
		}, nil},
		{"RSA2048-PKCS1v15", "rsa", 2, crypto.SHA256, digest32[:], func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}
		}, nil},
		{"RSA2048-PSS", "rsa", 2, pss, digest32[:], func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, pkcs11.NewPSSParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, 32))}
		}, nil},
		{"Ed25519", "ed", 3, crypto.Hash(0), []byte("benchmark message"), func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmEdDSA, nil)}
		}, nil},
		// SHA-1: what SoftHSM's CKM_RSA_PKCS_OAEP takes itself. The
		// ciphertext is made by BenchmarkOps.
		{"RSA2048-OAEP-decrypt", "rsa", 2, nil, nil, func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))}
		}, &rsa.OAEPOptions{Hash: crypto.SHA1}},
	}
}

// rawInput is what raw C_Sign gets for m (PKCS #1 v1.5 needs the DigestInfo).
func rawInput(m benchMech) []byte {
	if m.name == "RSA2048-PKCS1v15" {
		return append(append([]byte(nil), sha256Prefix...), digest32[:]...)
	}
	return m.input
}

// BenchmarkOps: every operation of benchMechs with every engine, serial
// and parallel, directly on SoftHSM and through p11-kit. Sub-benchmarks
// are named key=value, so that benchstat -col /eng puts the engines side by
// side (scripts/bench.sh).
func BenchmarkOps(b *testing.B) {
	tok := benchToken(b)
	mechs := benchMechs()
	for i, m := range mechs {
		if m.dec != nil {
			mechs[i].input = benchCiphertext(b, tok, m)
		}
	}
	for _, where := range []string{"direct", "remote"} {
		module := softhsmtest.SoftHSMModule
		var srv *softhsmtest.Server
		if where == "remote" {
			softhsmtest.RequireRemote(b)
			var err error
			if srv, err = softhsmtest.Serve(tok); err != nil {
				b.Fatal(err)
			}
			module = srv.Module()
		}
		for _, m := range mechs {
			if where == "remote" && m.name == "Ed25519" {
				continue // p11-kit 0.24's RPC does not carry CKM_EDDSA (the core's TestEd25519ThroughRemoting)
			}
			for _, par := range []string{"serial", "parallel"} {
				for _, eng := range []string{"raw", "crypto11", "hsm"} {
					if eng == "crypto11" && m.name == "Ed25519" {
						continue // crypto11 has no Ed25519
					}
					b.Run("where="+where+"/op="+m.name+"/par="+par+"/eng="+eng, func(b *testing.B) {
						runOpBench(b, eng, par == "parallel", module, tok, m)
					})
				}
			}
		}
		if srv != nil {
			srv.Stop()
		}
	}
}

// benchCiphertext encrypts a secret to the public half of m's key.
func benchCiphertext(b *testing.B, tok *softhsmtest.Token, m benchMech) []byte {
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	d, err := p.Decrypter(hsm.KeyRef{Label: m.label})
	if err != nil {
		b.Fatal(err)
	}
	return encryptTo(b, d.Public().(*rsa.PublicKey), []byte("a session key"), m.dec)
}

func runOpBench(b *testing.B, eng string, parallel bool, module string, tok *softhsmtest.Token, m benchMech) {
	var op func() error // safe for concurrent use
	var done func()
	switch eng {
	case "hsm":
		p, err := hsm.Open(hsm.Config{Path: module, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
		if err != nil {
			b.Fatal(err)
		}
		done = func() { p.Close() }
		if m.dec != nil {
			d, err := p.Decrypter(hsm.KeyRef{Label: m.label})
			if err != nil {
				b.Fatal(err)
			}
			op = func() error { _, err := d.Decrypt(nil, m.input, m.dec); return err }
			break
		}
		s, err := p.Signer(hsm.KeyRef{Label: m.label})
		if err != nil {
			b.Fatal(err)
		}
		op = func() error { _, err := s.Sign(nil, m.input, m.opts); return err }
	case "crypto11":
		c, err := crypto11.Configure(&crypto11.Config{Path: module, TokenLabel: tok.Label, Pin: tok.PIN})
		if err != nil {
			b.Fatal(err)
		}
		done = func() { c.Close() }
		s, err := c.FindKeyPair([]byte{m.id}, []byte(m.label))
		if err != nil || s == nil {
			b.Fatalf("crypto11 FindKeyPair: %v", err)
		}
		if m.dec != nil {
			d := s.(crypto.Decrypter)
			op = func() error { _, err := d.Decrypt(rand.Reader, m.input, m.dec); return err }
			break
		}
		op = func() error { _, err := s.Sign(rand.Reader, m.input, m.opts); return err }
	case "raw":
		r := openRaw(b, module, tok)
		done = r.close
		key := r.privateKey(m.label)
		input := rawInput(m)
		mech := m.mech()
		op = func() error {
			s := r.session()
			defer r.put(s)
			if m.dec != nil {
				if err := r.ctx.DecryptInit(s, mech, key); err != nil {
					return err
				}
				_, err := r.ctx.Decrypt(s, input)
				return err
			}
			if err := r.ctx.SignInit(s, mech, key); err != nil {
				return err
			}
			_, err := r.ctx.Sign(s, input)
			return err
		}
	}
	defer done()
	if err := op(); err != nil { // warm up: sessions opened, key found
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	if parallel {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := op(); err != nil {
					b.Error(err)
					return
				}
			}
		})
		return
	}
	for b.Loop() {
		if err := op(); err != nil {
			b.Fatal(err)
		}
	}
}
