package stepca

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/ce46d8f2/hsm/stepkms"
	"github.com/smallstep/certificates/api"
	"github.com/smallstep/certificates/ca"
	"go.step.sm/crypto/jose"
	"go.step.sm/crypto/kms/apiv1"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// Bounds of the waits. The build's is for a cold GOCACHE on two busy cores.
const (
	buildTimeout = 15 * time.Minute
	startTimeout = 60 * time.Second // from exec to "Serving HTTPS on"
	issueTimeout = 30 * time.Second // one issuance, or recovery after the HSM is back
	stopTimeout  = 30 * time.Second
)

// Lines step-ca logs when a reload fails or the old KMS does not close.
var failures = []string{"Reload failed", "error reloading", "error closing the key manager"}

const (
	intKey      = "pkcs11:id=7331;object=intermediate-key"
	provName    = "test@stepkms"
	commonName  = "leaf.example.com"
	servingLine = "Serving HTTPS on"
	droppedLine = "stepkms: a KMS was dropped without Close"
)

// TestStepCA runs step-ca with stepkms on a network HSM (SoftHSM behind
// p11-kit): it issues, survives the HSM's loss and return without a
// restart, reloads with SIGHUP (twice, then onto another configuration of
// the same module, which opens a second Provider of it), refuses a reload
// with a key name that is not there (serving on with the old CA; the KMS
// step-ca leaves open then is given back once collected), and shuts down
// cleanly.
func TestStepCA(t *testing.T) {
	softhsmtest.RequireRemote(t)
	bin := buildStepCA(t)
	dir := t.TempDir()
	tok := softhsmtest.NewToken(t, "stepca")
	root, inter := makePKI(t, tok, dir)

	jwk, err := jose.GenerateJWK("EC", "P-256", "ES256", "sig", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	pinFile := filepath.Join(dir, "pin")
	if err := os.WriteFile(pinFile, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := softhsmtest.StartServer(t, tok)
	addr := freeAddr(t)
	kmsURI := "pkcs11:module-path=" + srv.Module() + ";token=" + url.QueryEscape(tok.Label) + ";max-sessions=1?pin-source=" + pinFile
	conf := caConfig{dir: dir, addr: addr, kmsURI: kmsURI, key: intKey, jwk: jwk.Public()}
	cfgPath := conf.write(t)

	profAddr := freeAddr(t)
	c := startCA(t, bin, cfgPath, dir, profAddr)
	c.waitFor(t, servingLine, 1, startTimeout, "", 0)
	client, err := ca.NewClient("https://"+addr, ca.WithRootFile(filepath.Join(dir, "root_ca.crt")), ca.WithTimeout(issueTimeout))
	if err != nil {
		t.Fatal(err)
	}
	issuer := &issuer{client: client, jwk: jwk, aud: "https://" + addr + "/1.0/sign", root: root, inter: inter}
	issuer.must(t, "at start")

	// The HSM is lost: step-ca cannot sign; it is back: step-ca signs again,
	// with no restart.
	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := issuer.issue(); err == nil {
		t.Fatal("a certificate issued with the HSM killed")
	} else {
		t.Logf("with the HSM killed: %v", err)
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	issuer.eventually(t, "after the HSM's restart")
	t.Logf("issued again %v after the HSM's restart", time.Since(back).Round(time.Millisecond))

	// SIGHUP: a new authority, on a new KMS of the same configuration,
	// while the old one is open; then the old one is closed. Twice.
	for i := range 2 {
		c.reload(t, true, 2+i)
		issuer.must(t, fmt.Sprintf("after reload %d", i+1))
	}

	// A reload onto another configuration of the same module (here
	// max-sessions): a second Provider of the module opens beside the
	// first, which step-ca then closes.
	other := conf
	other.kmsURI = strings.Replace(kmsURI, ";max-sessions=1", ";max-sessions=2", 1)
	other.write(t)
	c.reload(t, true, 4)
	issuer.must(t, "after a reload onto another configuration of the module")

	// A reload whose key is not on the token: the new KMS opens (a
	// reference), the authority fails, and step-ca never closes that KMS.
	bad := conf
	bad.key = "pkcs11:id=7399;object=no-such-key"
	bad.write(t)
	c.reload(t, false, 1)
	c.logged(t, "Reload failed because the CA with new configuration could not be initialized", 1)
	c.logged(t, "create signer pkcs11:id=7399;object=no-such-key", 1)
	issuer.must(t, "after the failed reload")
	// That KMS, unreachable, gives its reference back once collected.
	c.collect(t, profAddr, droppedLine)

	// Back to the first configuration: the reload works.
	conf.write(t)
	c.reload(t, true, 5)
	issuer.must(t, "after the last reload")

	// SIGTERM: step-ca closes its KMS and exits.
	c.stop(t)
	log := c.text()
	for _, f := range []struct {
		line string
		n    int
	}{
		{"Reload failed", 1},
		{"error reloading", 1},
		{"error closing the key manager", 0},
		{"shutting down", 1},
		{servingLine, 5},
		{droppedLine, 1},
	} {
		if got := lines(log, f.line); got != f.n {
			t.Errorf("step-ca logged %q %d times, want %d", f.line, got, f.n)
		}
	}
}

// buildStepCA builds ./cmd/step-ca into a temporary directory, with the
// default GOCACHE, so that a second build is a link.
func buildStepCA(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "step-ca")
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	start := time.Now()
	// noyubikey: upstream's tag for builds without libpcsclite's headers.
	cmd := exec.CommandContext(ctx, "go", "build", "-tags", "noyubikey", "-o", bin, "./cmd/step-ca")
	// At the timeout, the go command and the compilers it started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go build ./cmd/step-ca (%v): %v\n%s", time.Since(start).Round(time.Second), err, out)
	}
	t.Logf("step-ca built in %v", time.Since(start).Round(100*time.Millisecond))
	return bin
}

// makePKI makes the root and intermediate keys on the token through
// stepkms (SoftHSM directly, before p11-kit serves the token), the root's
// self-signed certificate and the intermediate's, stores both on the token
// next to their keys and writes them for ca.json.
func makePKI(t *testing.T, tok *softhsmtest.Token, dir string) (root, inter *x509.Certificate) {
	t.Helper()
	uri := "pkcs11:module-path=" + softhsmtest.SoftHSMModule + ";token=" + url.QueryEscape(tok.Label) + "?pin-value=" + url.QueryEscape(tok.PIN)
	k, err := stepkms.New(context.Background(), apiv1.Options{Type: apiv1.PKCS11, URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := k.Close(); err != nil {
			t.Error(err)
		}
	}()
	const rootKey = "pkcs11:id=7330;object=root-key"
	rk, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: rootKey, SignatureAlgorithm: apiv1.ECDSAWithSHA256})
	if err != nil {
		t.Fatal(err)
	}
	ik, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: intKey, SignatureAlgorithm: apiv1.ECDSAWithSHA256})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := k.CreateSigner(&rk.CreateSignerRequest)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "stepkms Test Root CA"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, MaxPathLen: 1,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	root = create(t, rootTmpl, rootTmpl, rk.PublicKey, rs)
	interTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "stepkms Test Intermediate CA"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	inter = create(t, interTmpl, root, ik.PublicKey, rs)
	for name, c := range map[string]*x509.Certificate{"pkcs11:id=7330;object=root-cert": root, "pkcs11:id=7331;object=intermediate-cert": inter} {
		if err := k.StoreCertificate(&apiv1.StoreCertificateRequest{Name: name, Certificate: c}); err != nil {
			t.Fatal(err)
		}
	}
	for file, c := range map[string]*x509.Certificate{"root_ca.crt": root, "intermediate_ca.crt": inter} {
		if err := os.WriteFile(filepath.Join(dir, file), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root, inter
}

// create makes a certificate signed by signer and checks its signature.
func create(t *testing.T, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if tmpl == parent {
		parent = cert
	}
	if err := cert.CheckSignatureFrom(parent); err != nil {
		t.Fatal(err)
	}
	return cert
}

// caConfig is what the test's ca.json says.
type caConfig struct {
	dir, addr, kmsURI, key string
	jwk                    jose.JSONWebKey
}

// write writes ca.json and returns its path.
func (c caConfig) write(t *testing.T) string {
	t.Helper()
	cfg := map[string]any{
		"root":     filepath.Join(c.dir, "root_ca.crt"),
		"crt":      filepath.Join(c.dir, "intermediate_ca.crt"),
		"key":      c.key,
		"kms":      map[string]any{"type": "pkcs11", "uri": c.kmsURI},
		"address":  c.addr,
		"dnsNames": []string{"127.0.0.1", "localhost"},
		"logger":   map[string]any{"format": "text"},
		"authority": map[string]any{
			"provisioners": []any{map[string]any{"type": "JWK", "name": provName, "key": c.jwk}},
		},
	}
	b, err := json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(c.dir, "ca.json")
	// Written whole, then renamed: a reload never reads half a file.
	if err := os.WriteFile(path+".tmp", b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
	return path
}

// freeAddr returns a 127.0.0.1 address with a port free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// stepCA is a running step-ca and what it logged.
type stepCA struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has exited and its output is read

	mu  sync.Mutex // protects following fields
	log strings.Builder
	err error // of Wait
}

// startCA starts step-ca in a process group of its own, which the test's
// clean-up kills whatever happened, with its profiler on profAddr.
func startCA(t *testing.T, bin, cfgPath, dir, profAddr string) *stepCA {
	t.Helper()
	home := filepath.Join(dir, "home")
	if err := os.MkdirAll(filepath.Join(home, ".step"), 0o700); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, cfgPath)
	cmd.Env = append(os.Environ(), "HOME="+home, "STEPPATH="+filepath.Join(home, ".step"), "STEP_PROF_ADDR="+profAddr)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &stepCA{cmd: cmd, exited: make(chan struct{})}
	go func() {
		defer close(c.exited)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			c.mu.Lock()
			c.log.WriteString(sc.Text())
			c.log.WriteByte('\n')
			c.mu.Unlock()
		}
		err := cmd.Wait()
		c.mu.Lock()
		c.err = err
		c.mu.Unlock()
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-c.exited:
		case <-time.After(stopTimeout):
			t.Errorf("step-ca (pid %d) not gone %v after SIGKILL", cmd.Process.Pid, stopTimeout)
		}
		switch {
		case t.Failed():
			t.Logf("step-ca's log:\n%s", c.text())
		case testing.Verbose():
			// Without the request log (a line per request, with the
			// certificate and the token).
			var b strings.Builder
			for line := range strings.Lines(c.text()) {
				if !strings.HasPrefix(line, "time=") {
					b.WriteString(line)
				}
			}
			t.Logf("step-ca's log, requests left out:\n%s", b.String())
		}
	})
	return c
}

// lines counts the lines of text that contain s.
func lines(text, s string) int {
	n := 0
	for line := range strings.Lines(text) {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

func (c *stepCA) text() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.log.String()
}

// waitFor waits until step-ca has logged line n times, failing the test
// after timeout, at once when step-ca has exited, and, when unless is not
// empty, at once when step-ca has logged unless more than unlessN times.
func (c *stepCA) waitFor(t *testing.T, line string, n int, timeout time.Duration, unless string, unlessN int) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		text := c.text()
		if lines(text, line) >= n {
			return
		}
		if unless != "" && lines(text, unless) > unlessN {
			t.Fatalf("step-ca logged %q (%d times) while the test waited for %q %d times", unless, lines(text, unless), line, n)
		}
		select {
		case <-c.exited:
			t.Fatalf("step-ca exited (%v) before logging %q %d times", c.err, line, n)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("step-ca did not log %q %d times within %v", line, n, timeout)
		}
	}
}

// logged fails the test unless step-ca has logged line n times.
func (c *stepCA) logged(t *testing.T, line string, n int) {
	t.Helper()
	if got := lines(c.text(), line); got != n {
		t.Fatalf("step-ca logged %q %d times, want %d", line, got, n)
	}
}

// The last line of a reload: a working one's n-th "Serving HTTPS on", a
// failed one's "error reloading server: ...".
const reloadFailed = "error reloading server"

// reload sends SIGHUP and waits for its end: a working reload (ok) that
// makes the n-th "Serving HTTPS on", or the n-th failed one; it fails the
// test at once on the other outcome. Before that, it waits for the
// "reloading ..." of this SIGHUP (signals are handled one by one, so the
// previous reload, which may close its old KMS after its "Serving HTTPS
// on", is over by then) and checks that no KMS failed to close.
func (c *stepCA) reload(t *testing.T, ok bool, n int) {
	t.Helper()
	text := c.text()
	reloads, served, failed := lines(text, "reloading ..."), lines(text, servingLine), lines(text, reloadFailed)
	if err := c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	c.waitFor(t, "reloading ...", reloads+1, issueTimeout, "", 0)
	if got := lines(c.text(), "error closing the key manager"); got > 0 {
		t.Fatalf("step-ca could not close a KMS at a reload: %d times", got)
	}
	if ok {
		c.waitFor(t, servingLine, n, startTimeout, reloadFailed, failed)
		// Every failure line comes with a failed reload's last line.
		for _, f := range failures {
			want := failed
			if f == "error closing the key manager" {
				want = 0
			}
			if got := lines(c.text(), f); got != want {
				t.Fatalf("a reload that works logged %q (%d lines, want %d)", f, got, want)
			}
		}
		return
	}
	c.waitFor(t, reloadFailed, n, startTimeout, servingLine, served)
}

// collect makes step-ca collect garbage (its profiler's heap profile with
// gc=1) until it has logged line, within issueTimeout: runtime cleanups
// run after a collection, in their own goroutine.
func (c *stepCA) collect(t *testing.T, profAddr, line string) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(issueTimeout)
	for lines(c.text(), line) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("step-ca did not log %q within %v of collections", line, issueTimeout)
		}
		resp, err := client.Get("http://" + profAddr + "/debug/pprof/heap?gc=1")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("heap profile: %s", resp.Status)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for step-ca to exit.
func (c *stepCA) stop(t *testing.T) {
	t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.exited:
	case <-time.After(stopTimeout):
		t.Fatalf("step-ca still running %v after SIGTERM", stopTimeout)
	}
}

// issuer issues certificates through step-ca's API with the JWK
// provisioner's one-time tokens.
type issuer struct {
	client      *ca.Client
	jwk         *jose.JSONWebKey
	aud         string
	root, inter *x509.Certificate
}

// issue asks for one certificate and checks it: signed by the
// intermediate's key on the token, chained up to the root.
func (is *issuer) issue() (*x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: commonName}, DNSNames: []string{commonName},
	}, key)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	ott, err := is.token()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), issueTimeout)
	defer cancel()
	resp, err := is.client.SignWithContext(ctx, &api.SignRequest{CsrPEM: api.CertificateRequest{CertificateRequest: csr}, OTT: ott})
	if err != nil {
		return nil, err
	}
	leaf := resp.ServerPEM.Certificate
	switch {
	case leaf == nil:
		return nil, fmt.Errorf("no certificate in the response")
	case leaf.Subject.CommonName != commonName:
		return nil, fmt.Errorf("certificate for %q, want %q", leaf.Subject.CommonName, commonName)
	case !leaf.PublicKey.(*ecdsa.PublicKey).Equal(&key.PublicKey):
		return nil, fmt.Errorf("certificate for another key")
	}
	if err := leaf.CheckSignatureFrom(is.inter); err != nil {
		return nil, fmt.Errorf("certificate not signed by the intermediate key on the token: %w", err)
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(is.root)
	inters.AddCert(is.inter)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, DNSName: commonName}); err != nil {
		return nil, fmt.Errorf("certificate does not verify up to the root: %w", err)
	}
	return leaf, nil
}

// token makes a one-time token of the JWK provisioner for commonName.
func (is *issuer) token() (string, error) {
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: is.jwk.Key},
		new(jose.SignerOptions).WithType("JWT").WithHeader("kid", is.jwk.KeyID))
	if err != nil {
		return "", err
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return "", err
	}
	now := time.Now()
	claims := struct {
		jose.Claims
		SANs []string `json:"sans"`
	}{
		Claims: jose.Claims{
			Issuer: provName, Subject: commonName, Audience: jose.Audience{is.aud}, ID: hex.EncodeToString(id),
			NotBefore: jose.NewNumericDate(now), IssuedAt: jose.NewNumericDate(now), Expiry: jose.NewNumericDate(now.Add(5 * time.Minute)),
		},
		SANs: []string{commonName},
	}
	return jose.Signed(sig).Claims(claims).CompactSerialize()
}

// must issues a certificate or fails the test.
func (is *issuer) must(t *testing.T, when string) {
	t.Helper()
	if _, err := is.issue(); err != nil {
		t.Fatalf("issue %s: %v", when, err)
	}
}

// eventually issues a certificate within issueTimeout, trying again every
// 100 ms, or fails the test.
func (is *issuer) eventually(t *testing.T, when string) {
	t.Helper()
	deadline := time.Now().Add(issueTimeout)
	for {
		_, err := is.issue()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("issue %s: none within %v: %v", when, issueTimeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
