// A transcript of what pgjdbc sees from a server, for comparing Postgres with pgguard.
//
//   java -cp postgresql.jar:. JdbcTranscript <host> <port> <user> <password> <dbname>
//
// Every line is deterministic for a given server: values, update counts, SQLSTATEs. The
// only values that differ between servers (backend pids) are printed as facts about them
// ("own" / "other" / "unknown" for a notification's pid, "matches" for getBackendPID() against
// pg_backend_pid()). Each section runs on its own and prints "! <section> <SQLSTATE or
// exception class>" if it fails, so one failure does not hide the rest.
import java.io.ByteArrayInputStream;
import java.io.StringWriter;
import java.io.Writer;
import java.nio.charset.StandardCharsets;
import java.sql.*;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;
import org.postgresql.largeobject.LargeObject;
import org.postgresql.largeobject.LargeObjectManager;

public class JdbcTranscript {
    static String url;
    static Properties base = new Properties();

    interface Section { void run() throws Exception; }

    static void out(String s) { System.out.println(s); }

    static String state(Throwable e) {
        if (e instanceof SQLException) {
            SQLException se = (SQLException) e;
            String st = se.getSQLState();
            if (se.getNextException() != null && se.getNextException() != se)
                st += " next=" + se.getNextException().getSQLState();
            return st;
        }
        return e.getClass().getSimpleName();
    }

    static Connection current;   // the main connection: a failed section leaves it usable

    static void section(String name, Section s) {
        out("== " + name);
        try { s.run(); } catch (Throwable e) {
            out("! " + name + " " + state(e));
            try {
                if (current != null && !current.getAutoCommit()) {
                    current.rollback();
                    current.setAutoCommit(true);
                }
            } catch (SQLException e2) { out("! rollback " + e2.getSQLState()); }
        }
        System.out.flush();
    }

    static Connection connect(String... kv) throws SQLException {
        Properties p = new Properties();
        p.putAll(base);
        for (int i = 0; i + 1 < kv.length; i += 2) p.setProperty(kv[i], kv[i + 1]);
        return DriverManager.getConnection(url, p);
    }

    static String cell(ResultSet rs, int i) throws SQLException {
        Object o = rs.getObject(i);
        if (o == null) return "NULL";
        if (o instanceof byte[]) {
            StringBuilder b = new StringBuilder("\\x");
            for (byte x : (byte[]) o) b.append(String.format("%02x", x));
            return b.toString();
        }
        if (o instanceof Array) {
            Object[] a = (Object[]) ((Array) o).getArray();
            return java.util.Arrays.deepToString(a);
        }
        return o.getClass().getSimpleName() + ":" + o;
    }

    static void dump(String label, ResultSet rs) throws SQLException {
        ResultSetMetaData md = rs.getMetaData();
        StringBuilder head = new StringBuilder(label + " cols");
        for (int i = 1; i <= md.getColumnCount(); i++)
            head.append(" ").append(md.getColumnLabel(i)).append("/").append(md.getColumnTypeName(i));
        out(head.toString());
        while (rs.next()) {
            StringBuilder row = new StringBuilder(label + " row");
            for (int i = 1; i <= md.getColumnCount(); i++) row.append(" | ").append(cell(rs, i));
            out(row.toString());
        }
    }

    static final String TYPES_SQL =
        "SELECT ?::int4 AS i, ?::text AS t, 12345678901234::int8 AS big, 3.14159::numeric(10,5) AS n,"
        + " 2.5::float8 AS f, true AS b, '\\xdeadbeef'::bytea AS by, DATE '2024-02-29' AS d,"
        + " TIMESTAMP '2024-02-29 12:34:56.789' AS ts, TIMESTAMPTZ '2024-02-29 12:34:56+00' AS tz,"
        + " ARRAY[1,2,NULL,4]::int4[] AS arr, '{\"k\": [1, \"v\"]}'::jsonb AS j,"
        + " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, NULL::text AS nul,"
        + " interval '1 day 02:03:04' AS iv, 'héllo ☃'::text AS uni";

    public static void main(String[] args) throws Exception {
        url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[4];
        base.setProperty("user", args[2]);
        base.setProperty("password", args[3]);
        base.setProperty("sslmode", "disable");
        base.setProperty("ApplicationName", "jdbc-transcript");
        base.setProperty("options", "-c TimeZone=UTC");

        try (Connection c = connect()) {
            current = c;
            Statement st = c.createStatement();

            section("identity", () -> {
                ResultSet rs = st.executeQuery("SELECT pg_backend_pid()");
                rs.next();
                int pid = ((PGConnection) c).getBackendPID();
                out("getBackendPID matches pg_backend_pid: " + (pid == rs.getInt(1)));
                rs = st.executeQuery("SELECT count(*) FROM pg_stat_activity WHERE pid = " + pid);
                rs.next();
                out("getBackendPID in pg_stat_activity: " + rs.getInt(1));
                rs = st.executeQuery("SHOW TimeZone");
                rs.next();
                out("TimeZone " + rs.getString(1));
                out("autocommit " + c.getAutoCommit());
            });

            section("simple", () -> {
                out("execute(create) -> " + st.execute(
                    "CREATE TEMP TABLE jt (id int PRIMARY KEY, name text, val numeric, data bytea)"));
                out("update count " + st.executeUpdate(
                    "INSERT INTO jt SELECT g, 'n' || g, g * 1.5, NULL FROM generate_series(1, 5) g"));
                dump("q", st.executeQuery("SELECT * FROM jt ORDER BY id"));
                out("multi -> " + st.execute("UPDATE jt SET val = val + 1 WHERE id <= 2; SELECT count(*) FROM jt"));
                out("multi first update count " + st.getUpdateCount());
                out("multi more " + st.getMoreResults());
                dump("multi", st.getResultSet());
            });

            section("prepared", () -> {
                PreparedStatement ps = c.prepareStatement(TYPES_SQL);
                for (int round = 0; round < 7; round++) {      // past prepareThreshold (5)
                    ps.setInt(1, round);
                    ps.setString(2, "r" + round);
                    dump("p" + round, ps.executeQuery());
                }
                PreparedStatement ins = c.prepareStatement("INSERT INTO jt (id, name, data) VALUES (?, ?, ?)");
                for (int i = 10; i < 17; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, i % 2 == 0 ? null : "x" + i);
                    ins.setBytes(3, new byte[]{(byte) i, 0, (byte) 255});
                    out("ins " + i + " -> " + ins.executeUpdate());
                }
                try {
                    ins.setInt(1, 10); ins.setString(2, "dup"); ins.setBytes(3, null);
                    ins.executeUpdate();
                } catch (SQLException e) { out("dup -> " + e.getSQLState()); }
                dump("after", c.createStatement().executeQuery(
                    "SELECT id, name, data FROM jt WHERE id >= 10 ORDER BY id"));
            });

            section("batch", () -> {
                PreparedStatement ps = c.prepareStatement("INSERT INTO jt (id, name) VALUES (?, ?)");
                for (int i = 100; i < 110; i++) { ps.setInt(1, i); ps.setString(2, "b" + i); ps.addBatch(); }
                out("batch counts " + java.util.Arrays.toString(ps.executeBatch()));
                Statement s2 = c.createStatement();
                s2.addBatch("UPDATE jt SET name = 'u' WHERE id >= 100 AND id < 103");
                s2.addBatch("DELETE FROM jt WHERE id = 109");
                s2.addBatch("INSERT INTO jt (id) VALUES (200), (201)");
                out("stmt batch counts " + java.util.Arrays.toString(s2.executeBatch()));
                for (int i = 300; i < 304; i++) { ps.setInt(1, i == 302 ? 100 : i); ps.setString(2, "e"); ps.addBatch(); }
                try {
                    ps.executeBatch();
                } catch (BatchUpdateException e) {
                    out("failing batch -> " + state(e) + " counts " + java.util.Arrays.toString(e.getUpdateCounts()));
                }
                dump("batch", c.createStatement().executeQuery(
                    "SELECT count(*), min(id), max(id) FROM jt WHERE id >= 100"));
            });

            section("copy", () -> {
                CopyManager cm = ((PGConnection) c).getCopyAPI();
                st.execute("CREATE TEMP TABLE jc (a int, b text, c numeric)");
                StringBuilder in = new StringBuilder();
                for (int i = 0; i < 500; i++) in.append(i).append(",\"t,").append(i).append("\",").append(i / 4.0).append('\n');
                long n = cm.copyIn("COPY jc FROM STDIN (FORMAT csv)",
                    new ByteArrayInputStream(in.toString().getBytes(StandardCharsets.UTF_8)));
                out("copy in rows " + n);
                StringWriter w = new StringWriter();
                long m = cm.copyOut("COPY (SELECT * FROM jc WHERE a % 97 = 0 ORDER BY a) TO STDOUT (FORMAT csv, HEADER)", w);
                out("copy out rows " + m);
                for (String line : w.toString().split("\n")) out("copy> " + line);
                StringWriter w2 = new StringWriter();
                out("copy out text rows " + cm.copyOut("COPY (SELECT count(*), sum(a) FROM jc) TO STDOUT", w2));
                out("copy> " + w2.toString().trim());
                try {
                    cm.copyIn("COPY jc FROM STDIN (FORMAT csv)",
                        new ByteArrayInputStream("1,ok,1\nnot-a-number,x,1\n".getBytes(StandardCharsets.UTF_8)));
                } catch (SQLException e) { out("bad copy -> " + e.getSQLState()); }
                dump("copy", st.executeQuery("SELECT count(*) FROM jc"));
            });

            section("notify", () -> {
                int own = ((PGConnection) c).getBackendPID();
                st.execute("LISTEN jt_chan");
                st.execute("NOTIFY jt_chan, 'from-self'");
                st.execute("SELECT pg_notify('jt_chan', 'via-function')");
                int other;
                try (Connection c2 = connect()) {
                    other = ((PGConnection) c2).getBackendPID();
                    c2.createStatement().execute("NOTIFY jt_chan, 'from-other'");
                    c2.createStatement().execute("NOTIFY other_chan, 'not-listened'");
                }
                Thread.sleep(200);
                st.execute("SELECT 1");
                PGNotification[] ns = ((PGConnection) c).getNotifications(2000);
                if (ns == null) ns = new PGNotification[0];
                for (PGNotification n : ns) {
                    String who = n.getPID() == own ? "own" : n.getPID() == other ? "other" : "unknown";
                    out("notification " + n.getName() + " payload=" + n.getParameter() + " pid=" + who);
                }
                st.execute("UNLISTEN *");
            });

            section("large objects", () -> {
                c.setAutoCommit(false);
                LargeObjectManager lom = ((PGConnection) c).getLargeObjectAPI();
                long oid = lom.createLO(LargeObjectManager.READWRITE);
                LargeObject lo = lom.open(oid, LargeObjectManager.READWRITE);
                byte[] data = new byte[70000];
                for (int i = 0; i < data.length; i++) data[i] = (byte) (i * 31);
                lo.write(data);
                out("lo size " + lo.size());
                lo.seek(65536);
                byte[] back = lo.read(16);
                StringBuilder b = new StringBuilder();
                for (byte x : back) b.append(String.format("%02x", x));
                out("lo read at 65536 " + b);
                lo.truncate(100);
                out("lo size after truncate " + lo.size());
                lo.close();
                c.commit();
                lo = lom.open(oid, LargeObjectManager.READ);
                out("lo reopened size " + lo.size() + " first " + (lo.read(4)[3] & 0xff));
                lo.close();
                lom.delete(oid);
                c.commit();
                try {
                    lom.open(oid, LargeObjectManager.READ);
                } catch (SQLException e) { out("open deleted -> " + e.getSQLState()); c.rollback(); }
                c.setAutoCommit(true);
            });

            section("cancel", () -> {
                Statement slow = c.createStatement();
                Thread t = new Thread(() -> {
                    try { Thread.sleep(700); slow.cancel(); } catch (Exception e) { out("cancel thread " + state(e)); }
                });
                t.start();
                long t0 = System.nanoTime();
                try {
                    slow.execute("SELECT pg_sleep(20)");
                    out("pg_sleep not cancelled");
                } catch (SQLException e) { out("cancelled -> " + e.getSQLState()); }
                t.join();
                out("cancel within 10s: " + ((System.nanoTime() - t0) < 10_000_000_000L));
                dump("after cancel", st.executeQuery("SELECT 42"));
                st.setQueryTimeout(1);
                try {
                    st.execute("SELECT pg_sleep(10)");
                } catch (SQLException e) { out("query timeout -> " + e.getSQLState()); }
                st.setQueryTimeout(0);
            });

            section("fetch size", () -> {
                c.setAutoCommit(false);
                PreparedStatement ps = c.prepareStatement("SELECT g, repeat('x', g % 7) FROM generate_series(1, 23) g ORDER BY g");
                ps.setFetchSize(4);
                ResultSet rs = ps.executeQuery();
                StringBuilder sb = new StringBuilder("fetched");
                int n = 0;
                while (rs.next()) { sb.append(' ').append(rs.getInt(1)).append(':').append(rs.getString(2).length()); n++; }
                out(sb + " (" + n + ")");
                Statement s3 = c.createStatement();
                s3.setFetchSize(5);
                ResultSet r2 = s3.executeQuery("SELECT id FROM jt ORDER BY id");
                int k = 0; long sum = 0;
                while (r2.next()) { k++; sum += r2.getInt(1); }
                out("statement fetch rows " + k + " sum " + sum);
                c.commit();
                c.setAutoCommit(true);
            });

            section("transactions", () -> {
                c.setAutoCommit(false);
                st.executeUpdate("INSERT INTO jt (id) VALUES (500)");
                Savepoint sp = c.setSavepoint("sp1");
                st.executeUpdate("INSERT INTO jt (id) VALUES (501)");
                try { st.executeUpdate("INSERT INTO jt (id) VALUES (500)"); }
                catch (SQLException e) { out("in tx -> " + e.getSQLState()); }
                try { st.executeQuery("SELECT 1"); }
                catch (SQLException e) { out("aborted tx -> " + e.getSQLState()); }
                c.rollback(sp);
                c.commit();
                dump("tx", st.executeQuery("SELECT array_agg(id ORDER BY id) FROM jt WHERE id >= 500"));
                c.setAutoCommit(true);
            });

            section("errors", () -> {
                String[] bad = {"SELEC 1", "SELECT 1/0", "SELECT * FROM no_such_table_jt",
                                "SELECT 'abc'::int", "SELECT repeat('x', -1)::int"};
                for (String q : bad) {
                    try { st.executeQuery(q); out(q + " -> ok"); }
                    catch (SQLException e) { out(q + " -> " + e.getSQLState()); }
                }
                SQLWarning w;
                st.execute("DO $$ BEGIN RAISE NOTICE 'hello notice'; END $$");
                w = st.getWarnings();
                out("notice " + (w == null ? "none" : w.getSQLState() + " " + w.getMessage()));
            });
        }

        section("binary transfer", () -> {
            try (Connection b = connect("prepareThreshold", "1", "binaryTransfer", "true")) {
                PreparedStatement ps = b.prepareStatement(TYPES_SQL);
                for (int round = 0; round < 3; round++) {
                    ps.setInt(1, -round);
                    ps.setString(2, "bin" + round);
                    dump("b" + round, ps.executeQuery());
                }
                PreparedStatement p2 = b.prepareStatement(
                    "SELECT ?::int8 + 1, ?::float8 * 2, ?::bytea, ?::timestamptz");
                p2.setLong(1, Long.MAX_VALUE - 1);
                p2.setDouble(2, 1.25);
                p2.setBytes(3, new byte[]{0, 1, 2, (byte) 0xff});
                p2.setTimestamp(4, Timestamp.valueOf("2001-02-03 04:05:06.789"));
                dump("b-params", p2.executeQuery());
                p2.setLong(1, Long.MAX_VALUE);
                try { p2.executeQuery(); } catch (SQLException e) { out("overflow -> " + e.getSQLState()); }
            }
        });

        section("pipelined connections", () -> {
            // several connections open at once, each with its own server-prepared statement
            Connection[] cs = new Connection[4];
            for (int i = 0; i < cs.length; i++) cs[i] = connect("prepareThreshold", "1");
            for (int r = 0; r < 3; r++)
                for (int i = 0; i < cs.length; i++) {
                    PreparedStatement ps = cs[i].prepareStatement("SELECT ?::int * ?::int");
                    ps.setInt(1, i); ps.setInt(2, r);
                    ResultSet rs = ps.executeQuery(); rs.next();
                    out("conn " + i + " round " + r + " -> " + rs.getInt(1));
                }
            for (Connection x : cs) x.close();
        });
        out("== done");
    }
}
