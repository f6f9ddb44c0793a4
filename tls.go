package hsm

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
)

// TLSCertificate returns a tls.Certificate for the private key ref whose
// PrivateKey is a durable key (see DurableSigner), so that a tls.Config built
// once keeps working across HSM outages. The chain is chainPEM (PEM
// CERTIFICATE blocks, leaf first), or, when chainPEM is nil, the
// certificates on the token: the key's, then its issuers' as far as the
// token has them (CertificateChain). The leaf's public key
// must be the key's. An RSA key that allows decryption is a
// DurableDecrypter, so that TLS 1.2 RSA key exchange works too.
//
// It makes PKCS#11 calls (key and certificate lookup). Safe for concurrent
// use.
func (p *Provider) TLSCertificate(ref KeyRef, chainPEM []byte) (tls.Certificate, error) {
	const op = "tls certificate"
	k, err := p.lookupFor(ref, useSign) // one lookup, with Signer's checks
	if err != nil {
		return tls.Certificate{}, err
	}
	decrypt, use := k.kind == kindRSA && k.canDecrypt, useSign
	if decrypt {
		use = useDecrypt
	}
	d, err := p.durableFrom(k, use)
	if err != nil {
		return tls.Certificate{}, err
	}
	var key crypto.Signer = &DurableSigner{d}
	if decrypt {
		key = &DurableDecrypter{d}
	}
	var chain [][]byte
	if chainPEM != nil {
		for rest := chainPEM; ; {
			var b *pem.Block
			b, rest = pem.Decode(rest)
			if b == nil {
				break
			}
			if b.Type == "CERTIFICATE" {
				chain = append(chain, b.Bytes)
			}
		}
		if len(chain) == 0 {
			return tls.Certificate{}, opErr(op, p.Generation(), ErrInvalidOptions, "no PEM CERTIFICATE block in the chain")
		}
	} else {
		certs, err := p.CertificateChain(d.ref)
		if err != nil {
			return tls.Certificate{}, err
		}
		for _, c := range certs {
			chain = append(chain, c.Raw)
		}
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return tls.Certificate{}, opErr(op, p.Generation(), ErrInvalidOptions, "leaf certificate: %v", err)
	}
	if eq, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !eq.Equal(d.pub) {
		return tls.Certificate{}, opErr(op, p.Generation(), ErrKeyChanged, "the certificate %q is not for the key %s", leaf.Subject, d.ref)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

// GetCertificate returns a function for tls.Config.GetCertificate that
// serves cert (typically from TLSCertificate). While the provider is not
// healthy it fails at once with an error matching ErrUnavailable, so that no
// handshake starts that would fail at the signature. It makes no PKCS#11
// call.
func (p *Provider) GetCertificate(cert tls.Certificate) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		if err := p.ready("tls handshake"); err != nil {
			return nil, err
		}
		return &cert, nil
	}
}

// GetClientCertificate is GetCertificate for tls.Config.GetClientCertificate
// (client authentication).
func (p *Provider) GetClientCertificate(cert tls.Certificate) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		if err := p.ready("tls handshake"); err != nil {
			return nil, err
		}
		return &cert, nil
	}
}

// ready returns nil while the provider is healthy, else why not.
func (p *Provider) ready(op string) error {
	gen, st := p.gate.load()
	switch st {
	case StateHealthy:
		return nil
	case StateClosed:
		return &Error{Op: op, Generation: gen, Err: ErrClosed}
	}
	return &Error{Op: op, Generation: gen, Err: wrapf(ErrUnavailable, "%v", st)}
}
