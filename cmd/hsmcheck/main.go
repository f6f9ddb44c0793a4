// Command hsmcheck checks an HSM through package hsm, and does the everyday
// key and certificate tasks on it, for operators:
//
//	hsmcheck probe  -uri 'pkcs11:token=prod?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin'
//	hsmcheck sign   -uri 'pkcs11:token=prod;object=tls?module-path=...&pin-source=...'
//	hsmcheck bench  -uri 'pkcs11:token=prod;object=tls?...' -duration 10s -workers 4
//	hsmcheck soak   -duration 60s -outage-every 2s
//	hsmcheck keygen -uri 'pkcs11:token=prod?...' -type p256 -label tls [-id 01] [-decrypt] [-derive] [-mechanisms LIST]
//	hsmcheck list   -uri 'pkcs11:token=prod?...'
//	hsmcheck delete -uri 'pkcs11:token=prod?...' -label tls [-id 01]
//	hsmcheck cert import -uri 'pkcs11:token=prod;object=tls?...' -in tls.pem
//	hsmcheck cert export -uri 'pkcs11:token=prod;object=tls?...' [-chain] [-out tls.pem]
//	hsmcheck conform -uri 'pkcs11:token=prod?...' [-all] [-keep] [-nologin]
//
// probe shows the module, the token, the login and the keys it can see;
// sign signs once, verifies and shows the latency; bench measures
// throughput; soak runs the chaos soak on a SoftHSM2 token of its own
// behind a p11-kit server that it kills and pauses.
//
// keygen generates a key pair on the token (-type rsa2048, rsa3072,
// rsa4096, p256, p384, p521 or ed25519, in any case, or as the key types
// print themselves: "RSA-2048", "ECDSA P-256", "Ed25519"...) and prints its
// label, ID, type and public key (PEM). It refuses a label or an ID that a
// private key already has. -decrypt makes an RSA key decrypt too. -derive
// makes an EC key a key-agreement key (ECDH: CKA_DERIVE, and CKA_SIGN off),
// for hsm.Provider.KeyExchanger; -derive-and-sign one that agrees keys and
// signs.
// -mechanisms restricts the private key to the mechanisms listed
// (CKA_ALLOWED_MECHANISMS, where the token enforces it), by name or number,
// comma-separated: "CKM_SHA256_RSA_PKCS_PSS,CKM_SHA384_RSA_PKCS_PSS" makes
// an RSA key that signs only RSA-PSS messages hashed on the token (what
// package hsm's SignMessage, and so crypto/tls and crypto/x509, use).
//
// list shows every private key (reference, type, uses) and the certificate
// of each key (subject, issuer, expiry). Certificates without a private
// key, such as the CA certificates of a chain, are not listed.
//
// delete deletes a private key and its public half, and says which; the
// certificate of the key stays on the token.
//
// cert import stores a certificate for a key: the file is PEM (the first
// CERTIFICATE block is the key's certificate, and must be for it; further
// blocks are stored as chain certificates labelled with their subject's
// common name, skipping those already on the token) or DER. cert export
// writes the certificate of a key, with -chain its chain on the token
// too, as PEM to -out or the standard output.
//
// conform is the list of checks to run against a module and token before
// trusting package hsm with it (a Luna, CloudHSM, YubiHSM, nShield...): it
// opens the token and reads the module, token and key lists; generates
// RSA-2048, ECDSA P-256, P-384, P-521 and Ed25519 keys (with -all RSA-3072
// and RSA-4096 too), labelled hsmcheck-conform-TYPE (an earlier key with
// that label is deleted first), and signs with each (RSA PKCS #1 v1.5 and
// PSS, ECDSA, Ed25519), verifying in Go; decrypts with an RSA-2048 key
// (PKCS #1 v1.5, with SessionKeyLen, OAEP SHA-1, SHA-256, SHA-256 with a
// label); makes P-256, P-384 and P-521 key-agreement keys (KeySpec.Derive)
// and agrees with each (ECDH) with 20 random peers, compared with
// crypto/ecdh, and opens an HPKE message sealed to it; stores, reads back
// and deletes a self-signed certificate of the
// P-256 key; reads random bytes; re-initializes the library (a Signer must
// then fail with ErrStaleKey, a DurableSigner must sign); completes a TLS
// 1.3 handshake with the certificate stored on the token; and finds the
// key by a URI with object=. It prints a table: each check is ok,
// refused (the module refused it with a CKR code, or the token is
// write-protected: what the module cannot do, not a failure) or FAIL, with
// the code, the error or a measurement. The keys are deleted at the end
// unless -keep. -nologin opens a token that needs no login (NSS softokn).
// It exits 1 when a check FAILs.
//
// The key of keygen, delete and cert is named by -label and -id (hex), each
// in place of the URI's object= and id=; keygen's default ID is derived
// from the public key (as an X.509 subject key identifier).
//
// Exit status: 0 success, 1 failure, 2 usage.
package main

import (
	"crypto"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/soak"
	"github.com/ce46d8f2/hsm/internal/softhsm"
)

const usage = `usage: hsmcheck <command> [flags]

commands:
  probe  -uri URI                      module, token, login and the keys visible
  sign   -uri URI [-key LABEL]          sign once with the key, verify, show the latency
  bench  -uri URI [-key LABEL] [-duration 10s] [-workers N]
                                       signatures per second
  soak   [-duration 60s] [-outage-every 2s] [-workers 8] [-members N]
                                       chaos soak on a SoftHSM2 token of its own (needs softhsm2, p11-kit, opensc);
                                       with -members N >= 2, on an hsm.Group of N tokens holding the same keys,
                                       members killed at random with one always up: no signature may fail
  keygen -uri URI -type TYPE [-label L] [-id HEX] [-decrypt] [-derive | -derive-and-sign] [-mechanisms LIST]
                                       generate a key pair; print its label, ID, type and public key (PEM)
                                       TYPE: rsa2048, rsa3072, rsa4096, p256, p384, p521, ed25519
                                       LIST: the only mechanisms the key may use, e.g. CKM_SHA256_RSA_PKCS_PSS,0x44
  list   -uri URI                      the private keys, and the certificates of the keys
  delete -uri URI [-label L] [-id HEX]  delete a private key and its public half
  cert import -uri URI -in FILE [-label L] [-id HEX]
                                       store the certificate (PEM or DER) of a key; further PEM
                                       certificates as its chain
  cert export -uri URI [-label L] [-id HEX] [-chain] [-out FILE]
                                       write the certificate of a key (-chain: and its chain) as PEM
  conform -uri URI [-all] [-keep] [-nologin]
                                       the checks to pass before trusting hsm with a module and token:
                                       ok, refused (the module cannot) or FAIL, as a table

URI is a PKCS#11 URI (RFC 7512) with module-path and pin-value or pin-source (conform -nologin:
neither), and x-init-reserved for a module that needs it (NSS softokn), e.g.
  pkcs11:token=prod;object=tls?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin
-label and -id (hex) name a key in place of the URI's object= and id=.
Run 'hsmcheck <command> -h' for the flags of a command.
`

// usageError is a misuse of the command line: exit status 2.
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, args := args[0], args[1:]
	if cmd == "cert" {
		if len(args) == 0 || (args[0] != "import" && args[0] != "export") {
			sub := ""
			if len(args) > 0 {
				sub = fmt.Sprintf(" (not %q)", args[0])
			}
			fmt.Fprintf(stderr, "hsmcheck cert: want a subcommand: import or export%s\n\n%s", sub, usage)
			return 2
		}
		cmd, args = "cert "+args[0], args[1:]
	}
	fs := flag.NewFlagSet("hsmcheck "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	uri := fs.String("uri", "", "PKCS#11 URI of the token (and key)")
	var (
		key                   string
		duration, outageEvery time.Duration
		workers, members      int
		typ, label, id, mechs string
		decrypt, chain        bool
		derive, deriveSign    bool
		all, keep, noLogin    bool
		in, out               string
	)
	keyFlags := func() {
		fs.StringVar(&label, "label", "", "label of the key (default: object= of the URI)")
		fs.StringVar(&id, "id", "", "ID of the key in hex (default: id= of the URI)")
	}
	switch cmd {
	case "probe", "sign", "bench", "soak":
		fs.StringVar(&key, "key", "", "label of the key (default: object= of the URI)")
		fs.DurationVar(&duration, "duration", 10*time.Second, "how long (bench, soak)")
		fs.IntVar(&workers, "workers", 0, "concurrent goroutines (bench: 1; soak: 8)")
		fs.DurationVar(&outageEvery, "outage-every", 2*time.Second, "mean time between outages (soak; with -members, per member)")
		fs.IntVar(&members, "members", 0, "soak an hsm.Group of this many members (at least 2)")
	case "keygen":
		fs.StringVar(&typ, "type", "", "key type: rsa2048, rsa3072, rsa4096, p256, p384, p521 or ed25519")
		keyFlags()
		fs.Lookup("id").Usage = "ID of the key in hex (default: id= of the URI, else derived from the public key)"
		fs.BoolVar(&decrypt, "decrypt", false, "an RSA key decrypts too")
		fs.BoolVar(&derive, "derive", false, "an EC key agrees keys (ECDH, CKA_DERIVE) and does not sign")
		fs.BoolVar(&deriveSign, "derive-and-sign", false, "an EC key agrees keys (ECDH) and signs")
		fs.StringVar(&mechs, "mechanisms", "", "restrict the private key to these mechanisms (CKA_ALLOWED_MECHANISMS), comma-separated names or numbers, e.g. CKM_SHA256_RSA_PKCS_PSS,0x44")
	case "list":
	case "delete":
		keyFlags()
	case "cert import":
		fs.StringVar(&in, "in", "", "the certificate: a PEM file (the key's certificate first, then its chain) or a DER file")
		keyFlags()
	case "cert export":
		keyFlags()
		fs.BoolVar(&chain, "chain", false, "the certificate and its chain on the token")
		fs.StringVar(&out, "out", "", "the PEM file to write (default: the standard output)")
	case "conform":
		fs.BoolVar(&all, "all", false, "generate RSA-3072 and RSA-4096 keys too")
		fs.BoolVar(&keep, "keep", false, "keep the generated keys (labelled "+conformPrefix+"TYPE)")
		fs.BoolVar(&noLogin, "nologin", false, "do not log in: for tokens that need no PIN (NSS softokn)")
	default:
		fmt.Fprintf(stderr, "hsmcheck: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	var err error
	switch {
	case cmd != "soak" && *uri == "":
		err = usagef("-uri is required")
	case fs.NArg() > 0 && !slices.Contains([]string{"probe", "sign", "bench", "soak"}, cmd):
		err = usagef("unexpected argument %q", fs.Arg(0))
	}
	if err == nil {
		switch cmd {
		case "probe":
			err = probe(*uri, stdout)
		case "sign":
			err = sign(*uri, key, stdout)
		case "bench":
			err = bench(*uri, key, duration, max(workers, 1), stdout, stderr)
		case "soak":
			err = runSoak(duration, outageEvery, workers, members, stdout)
		case "keygen":
			err = keygen(*uri, typ, label, id, decrypt, derive, deriveSign, mechs, stdout)
		case "list":
			err = list(*uri, stdout)
		case "delete":
			err = deleteKey(*uri, label, id, stdout)
		case "cert import":
			err = importCert(*uri, label, id, in, stdout)
		case "cert export":
			err = exportCert(*uri, label, id, chain, out, stdout)
		case "conform":
			err = conform(*uri, all, keep, noLogin, stdout)
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "hsmcheck %s: %v\n", cmd, err)
		if errors.As(err, new(usageError)) {
			return 2
		}
		return 1
	}
	return 0
}

func open(uri string) (*hsm.Provider, error) {
	return hsm.OpenURI(uri, hsm.Config{ProbeInterval: -1, DisableAutoRecovery: true})
}

func probe(uri string, w io.Writer) error {
	p, err := open(uri)
	if err != nil {
		return err
	}
	defer p.Close()
	mi, err := p.ModuleInfo()
	if err != nil {
		return err
	}
	ti := p.TokenInfo()
	label, serial, model, manufacturer := ti.Label, ti.Serial, ti.Model, ti.Manufacturer
	fmt.Fprintf(w, "module:  %s %s (library %s, Cryptoki %s)\n", mi.Manufacturer, mi.LibraryDescription, mi.LibraryVersion, mi.CryptokiVersion)
	fmt.Fprintf(w, "token:   %q serial %s, %s %s\n", label, serial, manufacturer, model)
	fmt.Fprintln(w, "login:   ok")
	keys, err := p.Keys()
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "keys:    %d private keys\n", len(keys))
	for _, k := range keys {
		use := []string{}
		if k.CanSign {
			use = append(use, "sign")
		}
		if k.CanDecrypt {
			use = append(use, "decrypt")
		}
		if k.CanDerive {
			use = append(use, "derive")
		}
		fmt.Fprintf(w, "  %-40s %-14s %s\n", k.Ref, k.Type, strings.Join(use, ","))
	}
	return nil
}

// signer opens the provider and finds the key named by -key or the URI.
func signer(uri, label string) (*hsm.Provider, *hsm.Signer, error) {
	ref := hsm.KeyRef{Label: label}
	if label == "" {
		var err error
		if ref, err = hsm.KeyRefFromURI(uri); err != nil {
			return nil, nil, fmt.Errorf("%w (or give -key LABEL)", err)
		}
	}
	p, err := open(uri)
	if err != nil {
		return nil, nil, err
	}
	s, err := p.Signer(ref)
	if err != nil {
		p.Close()
		return nil, nil, err
	}
	return p, s, nil
}

// input returns what to sign with s and how, and a verifier.
func input(s *hsm.Signer) ([]byte, crypto.SignerOpts, func([]byte) bool) {
	return conformInput(s.Public())
}

func sign(uri, label string, w io.Writer) error {
	p, s, err := signer(uri, label)
	if err != nil {
		return err
	}
	defer p.Close()
	in, opts, ok := input(s)
	start := time.Now()
	sig, err := s.Sign(rand.Reader, in, opts)
	took := time.Since(start)
	if err != nil {
		return err
	}
	if !ok(sig) {
		return fmt.Errorf("the signature of %v does not verify under its public key", s)
	}
	fmt.Fprintf(w, "%v: signed and verified in %v (%d-byte signature)\n", s, took.Round(time.Microsecond), len(sig))
	return nil
}

func bench(uri, label string, d time.Duration, workers int, w, progress io.Writer) error {
	p, s, err := signer(uri, label)
	if err != nil {
		return err
	}
	defer p.Close()
	in, opts, _ := input(s)
	var n atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				if _, err := s.Sign(rand.Reader, in, opts); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				n.Add(1)
			}
		})
	}
	tty := isTerminal(progress)
	start := time.Now()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
loop:
	for {
		select {
		case <-done:
			break loop
		case <-tick.C:
			if tty {
				el := time.Since(start)
				fmt.Fprintf(progress, "\r%5.1fs  %d signatures  %.0f/s   ", el.Seconds(), n.Load(), float64(n.Load())/el.Seconds())
			}
		}
	}
	if tty {
		fmt.Fprint(progress, "\r\033[K")
	}
	if err, _ := firstErr.Load().(error); err != nil {
		return err
	}
	el := time.Since(start)
	fmt.Fprintf(w, "%v, %d goroutines: %d signatures in %v: %.0f/s, %v each\n",
		s, workers, n.Load(), el.Round(time.Millisecond), float64(n.Load())/el.Seconds(), (el * time.Duration(workers) / time.Duration(max(n.Load(), 1))).Round(time.Microsecond))
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func runSoak(d, every time.Duration, workers, members int, w io.Writer) error {
	if missing := softhsm.Missing(true); len(missing) > 0 {
		return fmt.Errorf("not installed: %s; run `make deps`", strings.Join(missing, ", "))
	}
	if every <= 0 || d <= 0 {
		return errors.New("-duration and -outage-every must be positive")
	}
	if members == 1 || members < 0 || members > 16 {
		return fmt.Errorf("-members %d: a group soak has 2 to 16 members", members)
	}
	dir, err := os.MkdirTemp("", "hsmcheck-soak-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := softhsm.Setup(dir); err != nil {
		return err
	}
	var res interface {
		fmt.Stringer
		OK() bool
	}
	if members > 0 {
		fmt.Fprintf(w, "group soak: %v, %d members each down about every %v (one always up), %d goroutines signing with ECDSA P-256 and RSA-2048 through p11-kit\n", d, members, every, max(workers, 8))
		res, err = soak.RunGroup(soak.Options{Duration: d, OutageEvery: every, Workers: workers, Log: w}, members)
	} else {
		fmt.Fprintf(w, "soak: %v, an outage about every %v, %d goroutines signing with ECDSA P-256 and RSA-2048 (PKCS #1 v1.5 and PSS) through p11-kit\n", d, every, max(workers, 8))
		res, err = soak.Run(soak.Options{Duration: d, OutageEvery: every, Workers: workers, Log: w})
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(w, res)
	if !res.OK() {
		return errors.New("the soak broke a promise (see above)")
	}
	return nil
}
