// Package hsm makes private keys that live in a Hardware Security Module,
// reached through PKCS#11, usable as ordinary [crypto.Signer] and
// [crypto.Decrypter] values, and survives the loss of the HSM.
//
// When a network HSM loses every member, its PKCS#11 library does not
// recover by itself: every call fails (CKR_DEVICE_ERROR and friends) until
// the application calls C_Finalize and C_Initialize. After that every
// session and object handle from before is meaningless, and the same
// numbers are handed out again, so a stale handle can reach a different
// key. A [Provider] owns the library's life cycle: it notices the loss,
// re-initializes when the HSM is back, and never lets a handle of one
// library instance (a generation) reach another.
//
// A TLS server holds its key for as long as it runs, through outages:
//
//	p, err := hsm.Open(hsm.Config{Path: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "prod", PIN: pin})
//	...
//	defer p.Close()
//	cert, err := p.TLSCertificate(hsm.KeyRef{Label: "tls"}, chainPEM) // nil: the chain stored on the token
//	...
//	srv.TLSConfig = &tls.Config{GetCertificate: p.GetCertificate(cert)}
//
// and so does any other signer: p.DurableSigner(hsm.KeyRef{Label: "ca"})
// is a crypto.Signer for x509.CreateCertificate, JWS and the like that
// keeps working across outages.
//
// # Choosing a key
//
// A key is a capability on a binding. The capability: the Signer kinds
// sign; the Decrypter kinds (RSA) decrypt, and sign. The binding is how the
// key reaches its private key on the token, generation after generation:
//
//   - Durable: [Provider.DurableSigner] and [Provider.DurableDecrypter]
//     return a [*DurableSigner] and a [*DurableDecrypter], and
//     [Provider.TLSCertificate] puts one in its tls.Certificate. In every
//     generation the key finds itself again and proves its private key (a
//     random challenge signed, or decrypted, under the public key pinned at
//     first lookup) before its first use. Hold it forever: this is the kind
//     for a tls.Config, a CA, a token issuer.
//   - Group: [Group.Signer] and [Group.Decrypter] return a [*GroupSigner]
//     and a [*GroupDecrypter]: one key on several HSMs, with failover (see
//     Groups).
//   - Generation-bound, the low level: [Provider.Signer] and
//     [Provider.Decrypter] return a [*Signer] and a [*Decrypter], and
//     [Provider.GenerateKey] returns a *Signer. After a re-initialization it
//     fails with [ErrStaleKey] and makes no PKCS#11 call: look it up again.
//
// Every kind has the same methods, with the same meaning:
//
//   - Public: the public key (pinned, for durable and group keys); no
//     PKCS#11 call.
//   - KeyRef: the key's own CKA_ID and CKA_LABEL, as read from the token.
//   - String: the key described, without secrets.
//   - Sign: signs now, exactly as crypto.Signer defines (a digest and
//     opts.HashFunc(), [*rsa.PSSOptions], ECDSA in ASN.1 DER), or fails
//     fast: [ErrUnavailable] while the HSM is unavailable.
//   - SignContext: Sign under ctx. A ctx already done makes no call; while
//     the HSM is unavailable it waits for it until ctx ends. A
//     generation-bound key that waited through a re-initialization gets
//     ErrStaleKey.
//   - SignMessage ([crypto.MessageSigner], which crypto/tls and
//     crypto/x509 use through [crypto.SignMessage]): signs a whole
//     message, hashed with opts.HashFunc() (Ed25519: not hashed, as by
//     Sign); the signature verifies as Sign's of the message's digest. A
//     zero hash is refused for RSA and ECDSA keys ([ErrInvalidOptions]).
//     SignMessageContext is SignMessage under ctx, as SignContext is Sign.
//   - Decrypt and DecryptContext, on the decrypter kinds, which all sign
//     too: as [rsa.PrivateKey.Decrypt] (PKCS #1 v1.5, with SessionKeyLen,
//     and OAEP), and under ctx as SignContext.
//   - Generation, on the generation-bound and durable kinds: the generation
//     the key is bound in.
//
// Every signing kind implements [ContextSigner] and [crypto.MessageSigner],
// every decrypting kind [ContextDecrypter]: accept those to take any of
// them (ContextSigner leaves SignMessage and SignMessageContext out, so
// that signers of other packages with SignContext alone still fit it).
//
// Key agreement is a third capability, on the same three bindings: an EC
// key with CKA_DERIVE (P-256, P-384, P-521; [KeySpec].Derive makes one that
// does nothing else) is an [ecdh.KeyExchanger], which crypto/hpke's
// hpke.NewDHKEMPrivateKey takes: [Provider.KeyExchanger],
// [Provider.DurableKeyExchanger] and [Group.KeyExchanger] return a
// [*KeyExchanger], a [*DurableKeyExchanger] and a [*GroupKeyExchanger],
// with PublicKey, Curve, ECDH (as [ecdh.PrivateKey.ECDH]), ECDHContext,
// Public, KeyRef and String. ECDH is three PKCS#11 calls (CKM_ECDH1_DERIVE
// into a session object, its value read, the object destroyed, on every
// path); a key that only agrees keys proves possession by an agreement.
//
// Which mechanism signs a message: the message is hashed here and the
// digest signed as Sign signs it (CKM_RSA_PKCS, CKM_RSA_PKCS_PSS,
// CKM_ECDSA; two PKCS#11 calls, only the digest on the wire), unless the
// key may not use that mechanism. A key restricted by its
// CKA_ALLOWED_MECHANISMS (read at lookup) to the token's hash-and-sign
// mechanisms, or one for which the token refused the raw mechanism
// (remembered for the key in its generation), signs the whole message
// with the combined mechanism of its hash: CKM_SHA256_RSA_PKCS,
// CKM_SHA256_RSA_PKCS_PSS with its parameters, CKM_ECDSA_SHA256, and the
// same for SHA-1, SHA-224, SHA-384 and SHA-512, also in two calls. Such a
// key cannot sign a digest: its Sign fails with [ErrUnsupportedKey], which
// says to use SignMessage. [KeySpec].AllowedMechanisms makes such keys.
//
// # Outages
//
// Each initialization of the library is a generation: 1 after [Open], one
// more after each re-initialization ([Provider.Generation]). A provider's
// [State] is healthy, unavailable, reinitializing, failed or closed. The
// first operation that meets a lost HSM fails with an error matching
// [ErrDeviceLost] (or a probe notices first, or the watchdog finds the HSM
// frozen: [ErrHung]), and the provider becomes unavailable: later operations
// fail fast with ErrUnavailable and never reach the dead device, and the
// provider re-initializes by itself, with backoff, until the HSM answers;
// then it is healthy in the next generation. Durable and group keys carry
// on; generation-bound keys are stale. A PIN refused during recovery, or
// another token behind the selector, makes the provider failed, and it
// does not retry: retrying a PIN locks tokens ([Provider.LastError] says
// why).
//
// [Provider.Reinitialize] re-initializes on demand: it stops admitting
// operations, drains the calls in flight, finalizes, initializes, finds the
// same token (same serial number) and logs in. Concurrent callers share one
// re-initialization, and [Provider.ReinitializeFrom], given the generation
// an error carried ([Error].Generation), does nothing once the provider is
// past it, so a stampede of callers that saw one outage causes one. With
// Config.DisableAutoRecovery the application calls them itself.
// [Provider.WaitHealthy] waits for recovery; [Provider.State],
// [Provider.Stats], [Provider.ReadyHandler] and Config.OnStateChange watch
// it.
//
// # Several Providers of one module
//
// [Open] a module already open in the process (another token of it, or
// the same token again) and the Providers share it: each keeps its own
// configuration, session pool, stats, state and callbacks. The module is
// the unit of C_Initialize and C_Finalize, as the standard makes it, so a
// re-initialization, asked for on any Provider of the module or started
// by any one's recovery, is one re-initialization of the module: it
// drains the calls of every Provider, makes one C_Finalize and one
// C_Initialize, logs every token in again and moves every Provider to its
// next generation; keys of before, whichever Provider they came from, are
// stale (generation-bound) or re-bind (durable, group). Each Provider's
// probe decides its own state, and the first that sees a module-wide loss
// re-initializes the module for all; concurrent callers across the
// Providers share one re-initialization. A loss that is one token's alone
// as far as the calls tell (C_GetTokenInfo of its slot fails while
// C_GetSlotList answers, the token is not present or logged out) while
// another Provider of the module, on another token, answers a probe, is
// recovered for that token alone, without C_Finalize: the module stays up
// for the others. (A module that cannot find a token again without being
// initialized, as SoftHSM, then needs a Reinitialize.)
//
// Login is the application's, per token: the first Provider of a token
// logs in, others with the same PIN and user type share the login, one
// with another PIN fails with [ErrPIN] without sending it (it would not
// be checked, and checking it would log the others out), and a PIN the
// token refused is not sent again until the module is re-initialized.
// [Provider.Close] closes the Provider's sessions, logs the token out when
// no other Provider uses it, and the last Close of the module finalizes
// it. A token created after the module was initialized may not be listed
// until it is re-initialized (SoftHSM lists tokens at C_Initialize).
//
// # Groups
//
// [OpenGroup] opens one provider per HSM holding the same key (HSMs
// without vendor high availability, separate partitions) as a [Group].
// Members may be tokens of one module; a loss of the module takes them
// down together (see above), so independent HSMs need a module each. Its
// keys spread operations over the healthy members and repeat an operation
// that failed because of its HSM (lost, unavailable, busy, not answering)
// on another member, so the caller sees an error only when no member could
// do it (ErrUnavailable), or for bad input, which is never repeated. A
// member that holds another key under the reference is excluded, never
// used. Each member is a Provider with its own generation and recovery
// ([Group.Members]); [Group.State] is healthy, degraded or unavailable.
//
// # Keys and certificates on the token
//
// [Provider.GenerateKey] makes a key pair in the HSM ([KeyType]: RSA,
// ECDSA, Ed25519). Unless the [KeySpec] asks otherwise, the private half is
// sensitive, never extractable, and has least privilege: it signs and does
// nothing else. Every attribute is read back after generation. GenerateKey returns
// the generation-bound kind; to hold the key, pass its KeyRef to
// DurableSigner. When an outage cuts a generation short, the retry with the
// same spec finishes it, or fails with [ErrKeyExists], and the token holds
// one pair. [Provider.ImportCertificate], [Provider.Certificate],
// [Provider.CertificateChain], [Provider.DeleteCertificate] and
// [Provider.DeleteKey] do the rest; [Provider.Keys] lists the keys. Writes
// use read-write sessions of their own, everything else read-only ones.
//
// A token keeps a key's two halves as two objects, so a key whose public
// key is not read from its private key object (EC, Ed25519) proves the
// pair at lookup, by a signature of a random challenge, and a durable key
// proves it in every generation. A pair that does not match is refused
// with [ErrKeyMismatch] ([ErrKeyChanged] for a durable key), never used.
//
// # URIs
//
// [OpenURI] opens the module, token and PIN that a PKCS#11 URI (RFC 7512)
// names, the configuration string of p11-kit, GnuTLS and OpenSSL's
// pkcs11-provider, and [KeyRefFromURI] gives the key it names:
//
//	pkcs11:token=prod;object=tls;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin
//
// [ParseURI] decodes every attribute of the RFC and refuses a malformed
// URI ([ErrURI]); OpenURI refuses an attribute it would otherwise ignore, so
// a typo does not go unnoticed. A [URI] prints its PIN as REDACTED.
//
// # Errors
//
// Every error of an operation is an [*Error] with the operation, the
// generation and, where the token gave one, the PKCS#11 return value;
// messages start with "hsm: ", as in
// "hsm: sign (generation 3): CKR_DEVICE_ERROR (0x30)". Match the cause
// with [errors.Is] and the sentinels ([ErrStaleKey], [ErrUnavailable],
// [ErrDeviceLost], [ErrPIN], [ErrKeyNotFound], ...: each says when it is
// returned), and reach the details with [errors.As] (*Error, or
// pkcs11.Error for the code). Refusals (bad input, a stale key, an
// unavailable or closed provider) make no PKCS#11 call. A PIN error never
// triggers a retry or a re-initialization. [CodeName] names a code.
//
// # Concurrency and bounds
//
// Providers, groups and keys are safe for concurrent use. Every wait is
// bounded, whatever the HSM does: for a session by Config.SessionWaitTimeout
// ([ErrBusy]); for the calls in flight before a finalize by
// Config.DrainTimeout ([ErrDrainTimeout]: nothing is finalized under a
// running call); for each of the provider's own calls into the module,
// and for an HSM that stops answering, by Config.ProbeTimeout ([ErrHung]).
// [Provider.Close] returns within DrainTimeout plus ProbeTimeout. A C call
// cannot be cancelled: a stuck one is left to return, and no second
// C_Finalize or C_Initialize enters the module until it has. At most
// Config.MaxSessions goroutines are inside the library at once.
//
// The Providers of a module must be its only users in the process: Open
// refuses a module that other code has initialized ([ErrModuleInUse]).
// Modules are loaded once and never unloaded.
package hsm
